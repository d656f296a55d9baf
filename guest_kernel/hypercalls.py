"""The guest kernel's hypercall stubs: every exit to the hypervisor.

Slow exits (HvPostMessage, MSR writes, the one-time CONNECT and
CONNECT_EVENT_PORT) are a request and a reply on the control socket, one
at a time.  HvSignalEvent on an open channel is the fast path: one write
to the channel's eventfd, no reply, as Linux issues it as a fast
hypercall.  Each is counted in ``exits``.

The control socket is also how the guest learns that its host is gone: a
host that dies closes it.  ``wait_host_gone`` watches for the hang-up
without reading (a private epoll set asking for EPOLLRDHUP alone: Linux
reports EPOLLHUP and EPOLLERR whatever was asked, and a reply arriving
wakes nothing there, so no exit's reply is taken), and an exit that meets
end-of-stream or a reset says the same.  From then on every exit raises
``HostGone`` at once.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections import Counter

import trio

from vmbus import hv
from vmbus.errors import HostGone, HypercallFailed
from vmbus.transport import (
    CONNECT_BODY,
    CONTROL_WORD,
    IO_BODY,
    IO_REPLY,
    KIND,
    STATUS,
    WRMSR_BODY,
    ExitKind,
    recv_msg,
    send_msg,
)


class Hypercalls:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.exits: Counter[str] = Counter()
        self._lock = trio.Lock()
        self.lost: str | None = None  # "the host went away (why)", once it has
        self._lost = trio.Event()

    @classmethod
    async def connect(cls, path: str, ram_fd: int, ram_size: int, sint_fd: int) -> Hypercalls:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await sock.connect(path)
            self = cls(sock)
            status, _ = await self._exit("connect", KIND.pack(ExitKind.CONNECT) + CONNECT_BODY.pack(ram_size),
                                         [ram_fd, sint_fd])
        except BaseException:
            sock.close()
            raise
        if status != hv.HvStatus.SUCCESS:
            sock.close()
            raise HypercallFailed("CONNECT", status)
        return self

    async def _roundtrip(self, what: str, data: bytes, fds: list[int] | None = None) -> tuple[bytes, list[int]]:
        """One exit: send it, wait for the hypervisor's reply, count it."""
        async with self._lock:
            if self.lost is not None:
                raise HostGone(self.lost)
            self.exits[what] += 1
            # An exit is not interruptible half-way: a cancelled wait would
            # leave its reply to be taken as the answer to the next exit.
            with trio.CancelScope(shield=True):
                try:
                    await send_msg(self.sock, data, fds or [])
                    reply, rfds = await recv_msg(self.sock)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    self._host_gone(exc.strerror or str(exc))
                    raise HostGone(self.lost) from exc
            if not reply and not rfds:  # end of stream: no reply is empty
                self._host_gone("it closed the control socket")
                raise HostGone(self.lost)
            return reply, rfds

    def _malformed(self, what: str, reply: bytes, fds: list[int]) -> HostGone:
        """A reply no hypervisor sends: the stream is not to be trusted after
        it, so the host counts as gone."""
        for fd in fds:
            os.close(fd)
        self._host_gone(f"it answered {what} with a malformed reply of {len(reply)} bytes")
        assert self.lost is not None
        return HostGone(self.lost)

    def _host_gone(self, reason: str) -> None:
        if self.lost is None:
            self.lost = f"the host went away ({reason})"
            self._lost.set()

    async def wait_host_gone(self) -> str:
        """Return once the host is gone (its end of the control socket closed,
        or an exit found it so), saying so in words."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_hangup)
            await self._lost.wait()
            nursery.cancel_scope.cancel()
        assert self.lost is not None
        return self.lost

    async def _watch_hangup(self) -> None:
        with select.epoll() as hangup:
            # EPOLLRDHUP only: EPOLLHUP and EPOLLERR come anyway (see the module note).
            hangup.register(self.sock.fileno(), select.EPOLLRDHUP)
            while not hangup.poll(0):
                await trio.lowlevel.wait_readable(hangup.fileno())
        self._host_gone("it closed the control socket")

    async def _exit(self, what: str, data: bytes, fds: list[int] | None = None) -> tuple[int, list[int]]:
        """An exit answered by a bare HV_STATUS (and perhaps fds)."""
        reply, rfds = await self._roundtrip(what, data, fds)
        if len(reply) != STATUS.size:
            raise self._malformed(what, reply, rfds)
        return STATUS.unpack(reply)[0], rfds

    async def hypercall(self, code: int, block: bytes, *, fast: bool = False) -> tuple[int, list[int]]:
        word = CONTROL_WORD.pack(hv.control_word(code, fast=fast))
        name = hv.HvCall(code).name.lower() if code in hv.HvCall._value2member_map_ else f"hypercall_{code:#x}"
        return await self._exit(name, KIND.pack(ExitKind.HYPERCALL) + word + block)

    async def post_message(self, connection_id: int, message: bytes) -> int:
        """HvPostMessage: returns the HV_STATUS (the caller decides on retries)."""
        block = hv.POST_MESSAGE_INPUT.pack(connection_id, 0, hv.VMBUS_MESSAGE_TYPE, len(message), message)
        status, _ = await self.hypercall(hv.HvCall.POST_MESSAGE, block)
        return status

    async def wrmsr(self, msr: int, value: int) -> None:
        status, _ = await self._exit("wrmsr", KIND.pack(ExitKind.WRMSR) + WRMSR_BODY.pack(msr, value))
        if status != hv.HvStatus.SUCCESS:
            raise HypercallFailed(f"WRMSR {msr:#x}", status)

    async def connect_event_port(self, connection_id: int) -> int:
        status, fds = await self.hypercall(hv.HvCall.CONNECT_EVENT_PORT, struct.pack("<I", connection_id))
        if status != hv.HvStatus.SUCCESS or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise HypercallFailed(f"CONNECT_EVENT_PORT {connection_id:#x}", status)
        return fds[0]

    async def io(self, address: int, size: int, *, write: bool = False, value: int = 0) -> int:
        """One trapped register access (port or MMIO): an exit and a round trip.
        Returns the value read (for a write, what the device echoes)."""
        request = KIND.pack(ExitKind.IO) + IO_BODY.pack(address, size, int(write), 0, value)
        reply, fds = await self._roundtrip("io", request)
        if len(reply) != IO_REPLY.size:
            raise self._malformed("io", reply, fds)
        status, result = IO_REPLY.unpack(reply)
        if status != hv.HvStatus.SUCCESS:
            raise HypercallFailed(f"I/O access at {address:#x}", status)
        return int(result)

    def signal_event(self, event_fd: int) -> None:
        """HvSignalEvent, fast: one eventfd write, no round trip."""
        self.exits["signal_event"] += 1
        os.eventfd_write(event_fd, 1)

    def close(self) -> None:
        self.sock.close()
