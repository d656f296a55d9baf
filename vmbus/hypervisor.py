"""The host's hypervisor half of a partition: exits in, SynIC out.

A ``Partition`` is one connected guest.  It owns the guest's RAM mapping
(``GuestMemory``), its SINT eventfd and its control socket, and it

- answers every exit that arrives on the socket (hypercalls and MSR
  writes) with an HV_STATUS, counting each one;
- delivers host-to-guest messages into SynIC message slot 2 of the
  guest's SIMP page with the real handshake: the slot is written only
  when its message_type is HVMSG_NONE, otherwise the message is queued
  and msg_pending is set, and the guest's EOM write delivers the next one;
- raises per-channel interrupts by setting the channel's bit in the SINT 2
  block of the guest's event-flags page and writing the SINT eventfd.

The SINT eventfd is the guest's (checked to be an eventfd at CONNECT), so
its counter and O_NONBLOCK are the guest's too: every write to it goes
through the partition's ``Signaller`` thread (``vmbus.interrupts``), never
the event loop.  The control socket is released through the fd reaper
(``vmbus.transport``): its queue may hold fds the guest sent last, whose
release the guest controls.  Queued messages are capped per partition and
across the host (``vmbus.limits``).

What the messages mean is the VMBus server's business (``vmbus.server``);
this module only moves them.  Facts: reference sections 4.1-4.4.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import trio

from . import hv
from .errors import RegisterAccessRefused
from .guest_memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from .interrupts import Signaller
from .limits import HOST_BUDGET, Budget
from .transport import (
    CONTROL_WORD,
    IO_BODY,
    IO_REPLY,
    KIND,
    STATUS,
    WRMSR_BODY,
    ExitKind,
    Truncated,
    reaper,
    recv_msg,
    release_fds,
    send_msg,
)

log = logging.getLogger(__name__)
SLOT_OFFSET = hv.VMBUS_MESSAGE_SINT * hv.HV_MESSAGE_SIZE
FLAGS_OFFSET = hv.VMBUS_MESSAGE_SINT * hv.EVENT_FLAGS_BYTES_PER_SINT


class Partition:
    """One guest, as the hypervisor sees it."""

    def __init__(self, pid: int, sock: trio.socket.SocketType, memory: GuestMemory, sint_fd: int,
                 budget: Budget = HOST_BUDGET) -> None:
        self.id = pid
        self.sock = sock
        self.memory = memory
        self.budget = budget
        self.limits = budget.limits
        self.signaller = Signaller(f"partition-{pid}", sint_fd)  # owns sint_fd from here on
        self.simp: int | None = None  # GPA of the SynIC message page
        self.siefp: int | None = None  # GPA of the event-flags page
        self._queue: deque[bytes] = deque()
        self.exits: Counter[str] = Counter()
        self.interrupts = 0
        self.messages_delivered = 0
        self.rejected: Counter[str] = Counter()
        # set by the VMBus server: (connection id, message bytes) -> status
        self.on_message: Callable[[int, bytes], int] = lambda conn, data: hv.HvStatus.INVALID_CONNECTION_ID
        # connection id -> eventfd to hand to the guest (CONNECT_EVENT_PORT)
        self.event_port: Callable[[int], int | None] = lambda conn: None
        self.on_signal: Callable[[int], bool] = lambda conn: False
        # trapped I/O: (base, length, device model) for emulated devices
        self.io_regions: list[tuple[int, int, Any]] = []

    def reject(self, what: str, detail: str) -> None:
        """Count and log a refused guest request (the guest is untrusted)."""
        self.rejected[what] += 1
        log.warning("partition %d: rejected %s: %s", self.id, what, detail)

    # -- exits ------------------------------------------------------------

    async def serve(self) -> None:
        """Answer exits until the guest disconnects."""
        while True:
            try:
                data, fds = await recv_msg(self.sock)
            except Truncated as exc:
                self.exits["malformed"] += 1
                self.reject("exit", str(exc))
                await send_msg(self.sock, STATUS.pack(hv.HvStatus.INVALID_HYPERCALL_INPUT))
                continue
            if not data:
                return  # end of stream: the guest went away
            if fds:  # after CONNECT no exit carries fds
                release_fds(fds)
                if reaper.saturated:
                    self.reject("exit", "fds sent while the host is still closing earlier ones; disconnecting")
                    return
            try:
                reply, reply_fds = await self.handle_exit(data)
            except Exception as exc:  # noqa: BLE001 - a guest must never crash the host
                self.reject("exit", f"internal error: {exc!r}")  # the one warning line for this event
                log.debug("partition %d: exit handling failed", self.id, exc_info=True)
                reply, reply_fds = self._status_reply(data, hv.HvStatus.INVALID_PARAMETER), []
            await send_msg(self.sock, reply, reply_fds)

    @staticmethod
    def _status_reply(data: bytes, status: int) -> bytes:
        """A bare status in the reply format the exit kind expects."""
        if len(data) >= KIND.size and KIND.unpack_from(data)[0] == ExitKind.IO:
            return IO_REPLY.pack(status, 0)
        return STATUS.pack(status)

    async def handle_exit(self, data: bytes) -> tuple[bytes, list[int]]:
        """One exit to its reply datagram (and any fds to pass back)."""
        if len(data) < KIND.size:
            self.exits["malformed"] += 1
            self.reject("exit", f"{len(data)}-byte datagram")
            return STATUS.pack(hv.HvStatus.INVALID_HYPERCALL_INPUT), []
        (kind,) = KIND.unpack_from(data)
        body = data[KIND.size :]
        if kind == ExitKind.IO:
            return await self._io(body), []
        if kind == ExitKind.HYPERCALL:
            status, fds = self._hypercall(body)
            return STATUS.pack(status), fds
        if kind == ExitKind.WRMSR:
            self.exits["wrmsr"] += 1
            return STATUS.pack(self._wrmsr(body)), []
        self.exits["malformed"] += 1
        self.reject("exit", f"unknown exit kind {kind}")
        return STATUS.pack(hv.HvStatus.INVALID_HYPERCALL_INPUT), []

    async def _io(self, body: bytes) -> bytes:
        """A trapped register access: route it to the device model at that address."""
        self.exits["io"] += 1
        if len(body) != IO_BODY.size:
            self.reject("io", "bad size")
            return IO_REPLY.pack(hv.HvStatus.INVALID_HYPERCALL_INPUT, 0)
        addr, size, write, _, value = IO_BODY.unpack(body)
        if size not in (1, 2, 4, 8):
            self.reject("io", f"access size {size}")
            return IO_REPLY.pack(hv.HvStatus.INVALID_PARAMETER, 0)
        for base, length, model in self.io_regions:
            if base <= addr < base + length:
                # A model refuses an access its register does not take with
                # RegisterAccessRefused; anything else it raises is a bug,
                # caught in serve(): an error status, never a host crash.
                try:
                    value = await model.access(addr - base, size, bool(write), value & ((1 << (8 * size)) - 1))
                except RegisterAccessRefused as exc:
                    self.reject("io", f"{addr:#x}: {exc}")
                    return IO_REPLY.pack(hv.HvStatus.INVALID_PARAMETER, 0)
                return IO_REPLY.pack(hv.HvStatus.SUCCESS, value)
        # Nothing decodes this address: reads float high, as on a real bus.
        return IO_REPLY.pack(hv.HvStatus.SUCCESS, 0 if write else (1 << (8 * size)) - 1)

    def _hypercall(self, body: bytes) -> tuple[int, list[int]]:
        if len(body) < CONTROL_WORD.size:
            self.exits["malformed"] += 1
            self.reject("hypercall", "no control word")
            return hv.HvStatus.INVALID_HYPERCALL_INPUT, []
        code, fast, reps = hv.split_control_word(CONTROL_WORD.unpack_from(body)[0])
        block = body[CONTROL_WORD.size :]
        if code == hv.HvCall.POST_MESSAGE:
            self.exits["post_message"] += 1
            if fast or reps or len(block) != hv.POST_MESSAGE_INPUT.size:
                self.reject("post_message", "bad control word or input size")
                return hv.HvStatus.INVALID_HYPERCALL_INPUT, []
            conn, _, mtype, size, payload = hv.POST_MESSAGE_INPUT.unpack(block)
            if mtype != hv.VMBUS_MESSAGE_TYPE or size > hv.MESSAGE_PAYLOAD_MAX:
                self.reject("post_message", f"message type {mtype}, payload size {size}")
                return hv.HvStatus.INVALID_PARAMETER, []
            return self.on_message(conn & 0xFFFFFF, payload[:size]), []
        if code == hv.HvCall.SIGNAL_EVENT:
            self.exits["signal_event"] += 1
            if len(block) < hv.SIGNAL_EVENT_INPUT.size:
                return hv.HvStatus.INVALID_HYPERCALL_INPUT, []
            conn, _, _ = hv.SIGNAL_EVENT_INPUT.unpack_from(block)
            return (hv.HvStatus.SUCCESS if self.on_signal(conn) else hv.HvStatus.INVALID_CONNECTION_ID), []
        if code == hv.HvCall.CONNECT_EVENT_PORT:
            self.exits["connect_port"] += 1
            if len(block) < 4:
                return hv.HvStatus.INVALID_HYPERCALL_INPUT, []
            (conn,) = struct.unpack_from("<I", block)
            fd = self.event_port(conn)
            if fd is None:
                self.reject("connect_port", f"no open channel on connection id {conn:#x}")
                return hv.HvStatus.INVALID_CONNECTION_ID, []
            return hv.HvStatus.SUCCESS, [fd]
        self.exits["unknown_hypercall"] += 1
        self.reject("hypercall", f"unknown code {code:#x}")
        return hv.HvStatus.INVALID_HYPERCALL_CODE, []

    def _wrmsr(self, body: bytes) -> int:
        if len(body) != WRMSR_BODY.size:
            self.reject("wrmsr", "bad size")
            return hv.HvStatus.INVALID_HYPERCALL_INPUT
        msr, value = WRMSR_BODY.unpack(body)
        if msr in (hv.HV_X64_MSR_SIMP, hv.HV_X64_MSR_SIEFP):
            gpa = value & ~(PAGE_SIZE - 1)
            enabled = bool(value & hv.MSR_ENABLE)
            if enabled:
                try:
                    self.memory.check_range(gpa, PAGE_SIZE)
                except GuestMemoryError as exc:
                    self.reject("wrmsr", str(exc))
                    return hv.HvStatus.INVALID_PARAMETER
            if msr == hv.HV_X64_MSR_SIMP:
                self.simp = gpa if enabled else None
                self.deliver()
            else:
                self.siefp = gpa if enabled else None
            return hv.HvStatus.SUCCESS
        if msr == hv.HV_X64_MSR_EOM:
            self.deliver()
            return hv.HvStatus.SUCCESS
        self.reject("wrmsr", f"unknown MSR {msr:#x}")
        return hv.HvStatus.INVALID_PARAMETER

    # -- SynIC ------------------------------------------------------------

    def message_room(self, needed: int) -> bool:
        """Whether ``needed`` more messages fit this partition's queue (a
        request whose answers would not fit is refused before it acts)."""
        return len(self._queue) + needed <= self.limits.queued_messages

    def post(self, message: bytes) -> bool:
        """Queue a message for the guest's SINT 2 slot and try to deliver it;
        False (logged) if the queue is at its per-partition or host cap."""
        if len(self._queue) >= self.limits.queued_messages:
            self.reject("synic", f"{len(self._queue)} messages queued (the cap): guest is not consuming; dropping")
            return False
        if not self.budget.take("queued_messages"):
            self.reject("synic", "host-wide cap of queued messages reached; dropping")
            return False
        self._queue.append(message)
        self.deliver()
        return True

    def deliver(self) -> None:
        """Move queued messages into the slot while it is free."""
        if self.simp is None:
            return
        slot = self.simp + SLOT_OFFSET
        mem = self.memory
        while self._queue:
            if mem.load32(slot) != hv.HVMSG_NONE:
                # Slot busy: ask for an EOM, then look again.  The guest
                # clears message_type and then reads msg_pending; we set
                # msg_pending and then read message_type.  Both seq_cst, so
                # one of us sees the other's store and nothing is stranded.
                mem.or8(slot + 5, hv.MSG_FLAG_PENDING)
                if mem.load32(slot) != hv.HVMSG_NONE:
                    return
            msg = self._queue.popleft()
            self.budget.give("queued_messages")
            view = mem.view(slot, hv.HV_MESSAGE_SIZE)
            view[16 : 16 + len(msg)] = msg
            view[4:16] = struct.pack("<BBHQ", len(msg), hv.MSG_FLAG_PENDING if self._queue else 0, 0, 0)
            mem.store32(slot, hv.VMBUS_MESSAGE_TYPE)  # publish last: the guest reads the type first
            self.messages_delivered += 1
            self._raise_sint()
            return  # one message per slot; the guest's EOM brings the next

    def interrupt(self, relid: int) -> None:
        """Channel interrupt: set the relid's event flag, then signal the SINT."""
        if self.siefp is None or not 0 <= relid < hv.EVENT_FLAGS_BYTES_PER_SINT * 8:
            return
        self.memory.or64(self.siefp + FLAGS_OFFSET + (relid // 64) * 8, 1 << (relid % 64))
        self._raise_sint()

    def _raise_sint(self) -> None:
        self.interrupts += 1
        self.signaller.raise_sint()  # never blocks: the write happens on the signaller's thread

    def ring_guest_eventfd(self, key: object, fd: int) -> None:
        """Add 1 to an eventfd the guest shares (HvSignalEvent as a hypercall)."""
        self.signaller.ring(key, fd)

    def close(self) -> None:
        """``aclose`` without trio, for tools that drive a partition in-process
        with a SINT eventfd and socket of their own making."""
        self.signaller.close()
        self.budget.give("queued_messages", len(self._queue))
        self._queue.clear()
        self.sock.close()
        self.memory.close()

    async def aclose(self) -> None:
        """Release everything this partition holds; never blocks the loop."""
        await self.signaller.aclose()
        self.budget.give("queued_messages", len(self._queue))
        self._queue.clear()
        release_fds([self.sock.detach()])
        self.memory.close()

    def snapshot(self) -> dict[str, object]:
        return {
            "id": self.id,
            "ram_bytes": self.memory.size,
            "exits": dict(self.exits),
            "interrupts": self.interrupts,
            "messages_delivered": self.messages_delivered,
            "messages_queued": len(self._queue),
            "rejected": dict(self.rejected),
        }
