"""The host, in-process, as the fuzz targets drive it.

``Machine`` is one guest's worth of host: guest RAM (a sealed memfd the
target writes as the guest would, mapped by the host through
``GuestMemory``), a ``Partition`` answering exits and, optionally, the
``VmbusServer`` with real devices behind it.  The target acts as the
guest: it sends exit datagrams to ``Partition.handle_exit`` and reads the
host's messages out of the SynIC message slot, clearing it and writing
EOM exactly as the guest kernel does.

Helpers for invariants: ``InvariantBroken`` (what a target raises when the
host misbehaved without crashing), ``changed_ranges`` (which bytes of a
buffer differ between two snapshots) and ``open_fds``.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from ring import SharedMemory
from vmbus import hv
from vmbus import protocol as P
from vmbus.device import DeviceSpec
from vmbus.guest_memory import PAGE_SIZE, GuestMemory
from vmbus.hypervisor import SLOT_OFFSET, Partition
from vmbus.server import VmbusServer
from vmbus.transport import IO_REPLY, KIND, STATUS, WRMSR_BODY, ExitKind, reaper

HV_STATUSES = frozenset(int(s) for s in hv.HvStatus)
SIMP_PFN, SIEFP_PFN = 0, 1  # where the fuzzed guest keeps its SynIC pages
HOST_TO_GUEST = frozenset({
    P.MsgType.OFFERCHANNEL, P.MsgType.RESCIND_CHANNELOFFER, P.MsgType.ALLOFFERS_DELIVERED,
    P.MsgType.OPENCHANNEL_RESULT, P.MsgType.GPADL_CREATED, P.MsgType.GPADL_TORNDOWN,
    P.MsgType.VERSION_RESPONSE, P.MsgType.UNLOAD_RESPONSE,
})


class InvariantBroken(AssertionError):
    """The host answered, but not as it must (wrong status, stray write, ...)."""


def check(condition: object, what: str) -> None:
    if not condition:
        raise InvariantBroken(what)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def no_fd_left_open() -> Iterator[None]:
    """The block must close every descriptor it opens.  Counted once the
    host's fd reaper has closed what it was handed (it closes off the loop's
    thread) and after a garbage collection (a cycle is not a leak)."""
    before = open_fds()
    yield
    after = open_fds()
    if after != before:
        reaper.drain(5.0)
        gc.collect()
        after = open_fds()
    check(after <= before, f"{after - before} descriptors left open")


def changed_ranges(before: bytes, after: bytes | memoryview, granule: int = 64) -> list[tuple[int, int]]:
    """[start, end) byte ranges where ``after`` differs from ``before``,
    found granule by granule (exact bounds inside each granule)."""
    after = bytes(after)
    out: list[tuple[int, int]] = []
    if before == after:
        return out
    for off in range(0, len(before), granule):
        a, b = before[off : off + granule], after[off : off + granule]
        if a == b:
            continue
        first = next(i for i in range(len(a)) if a[i] != b[i])
        last = max(i for i in range(len(a)) if a[i] != b[i])
        start, end = off + first, off + last + 1
        if out and out[-1][1] >= start - granule:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def inside(ranges: Iterable[tuple[int, int]], allowed: Iterable[tuple[int, int]]) -> bool:
    """Whether every range lies within the union of ``allowed``."""
    union: list[tuple[int, int]] = []
    for a, b in sorted(allowed):
        if union and a <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], b))
        else:
            union.append((a, b))
    return all(any(a <= s and e <= b for a, b in union) for s, e in ranges)


class GuestRam:
    """A guest's RAM: the sealed memfd the guest writes (``ram``, ``buf``) and
    the host's checked mapping of the same pages (``memory``)."""

    def __init__(self, pages: int) -> None:
        self.ram = SharedMemory.create(pages * PAGE_SIZE)
        self.memory = GuestMemory(os.dup(self.ram.fd), pages * PAGE_SIZE)

    @property
    def buf(self) -> memoryview:
        return memoryview(self.ram.buf)

    def close(self) -> None:
        self.memory.close()
        self.ram.close()


class Machine(GuestRam):
    """Guest RAM plus the host's partition (and bus) for it."""

    def __init__(self, ram_pages: int = 64) -> None:
        super().__init__(ram_pages)
        self.sint = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer.close()
        self.partition = Partition(1, trio.socket.from_stdlib_socket(self._sock), self.memory, os.dup(self.sint))
        self.server: VmbusServer | None = None
        self.received: list[bytes] = []  # host-to-guest messages, in order

    def start_bus(self, nursery: trio.Nursery, devices: list[DeviceSpec],
                  config: dict[str, dict[str, Any]] | None = None) -> VmbusServer:
        self.server = VmbusServer(self.partition, devices, nursery, device_config=config)
        return self.server

    async def exit(self, data: bytes) -> tuple[bytes, list[int]]:
        """One exit, as ``Partition.serve`` would answer it: the reply and
        fds.  A host exception is a finding (serve would turn it into an
        error status, but log a traceback a guest can trigger at will)."""
        reply, fds = await self.partition.handle_exit(data)
        kind = KIND.unpack_from(data)[0] if len(data) >= KIND.size else None
        expected = IO_REPLY.size if kind == ExitKind.IO and len(data) >= KIND.size else STATUS.size
        check(len(reply) == expected, f"reply of {len(reply)} bytes to exit kind {kind}")
        check(STATUS.unpack_from(reply)[0] in HV_STATUSES, f"reply status {reply[:4].hex()} is no HV_STATUS")
        check(not fds or (kind == ExitKind.HYPERCALL and STATUS.unpack_from(reply)[0] == hv.HvStatus.SUCCESS),
              "fds passed with a reply that is not a successful CONNECT_EVENT_PORT")
        return reply, fds

    async def wrmsr(self, msr: int, value: int) -> int:
        reply, _ = await self.exit(KIND.pack(ExitKind.WRMSR) + WRMSR_BODY.pack(msr, value))
        return STATUS.unpack(reply)[0]

    async def enable_synic(self) -> None:
        check(await self.wrmsr(hv.HV_X64_MSR_SIMP, SIMP_PFN * PAGE_SIZE | hv.MSR_ENABLE) == 0, "SIMP refused")
        check(await self.wrmsr(hv.HV_X64_MSR_SIEFP, SIEFP_PFN * PAGE_SIZE | hv.MSR_ENABLE) == 0, "SIEFP refused")

    async def post(self, conn_id: int, payload: bytes) -> int:
        block = hv.POST_MESSAGE_INPUT.pack(conn_id, 0, hv.VMBUS_MESSAGE_TYPE, len(payload), payload)
        word = struct.pack("<Q", hv.control_word(hv.HvCall.POST_MESSAGE))
        reply, _ = await self.exit(KIND.pack(ExitKind.HYPERCALL) + word + block)
        return STATUS.unpack(reply)[0]

    async def drain_messages(self) -> list[bytes]:
        """Take every message the host delivered to the SIMP slot (clear the
        type, then EOM, as the guest kernel does); each is checked to be a
        well-formed host-to-guest message."""
        got = []
        slot = SIMP_PFN * PAGE_SIZE + SLOT_OFFSET
        for _ in range(P.MAX_MESSAGE_SIZE * 8):  # the host queues at most 1024; stop long before looping
            mtype, size = struct.unpack_from("<IB", self.ram.buf, slot)
            if mtype == hv.HVMSG_NONE:
                break
            check(mtype == hv.VMBUS_MESSAGE_TYPE and size <= P.MAX_MESSAGE_SIZE, f"slot type {mtype}, size {size}")
            data = bytes(self.ram.buf[slot + 16 : slot + 16 + size])
            struct.pack_into("<I", self.ram.buf, slot, hv.HVMSG_NONE)
            check(await self.wrmsr(hv.HV_X64_MSR_EOM, 0) == 0, "EOM refused")
            try:
                msg = P.decode(data)
            except P.ProtocolError as exc:
                raise InvariantBroken(f"host sent an undecodable message {data.hex()}: {exc}") from None
            check(msg.TYPE in HOST_TO_GUEST, f"host sent a guest-to-host message {msg.TYPE.name}")
            got.append(data)
        self.received.extend(got)
        return got

    async def close(self) -> None:
        if self.server is not None:
            with trio.CancelScope(shield=True):
                await self.server.close()
        await self.partition.aclose()  # its RAM mapping included
        os.close(self.sint)
        self.ram.close()


class ScratchDisk:
    """A small disk image in a private temporary directory, reused across
    inputs and reset to its pattern by ``reset``."""

    def __init__(self, size: int = 64 << 10) -> None:
        # In RAM where there is a tmpfs: a flush is then free, not a disk sync.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.TemporaryDirectory(prefix="pvbus-fuzz-", dir=shm)
        self.path = Path(self.dir.name) / "disk.img"
        self.pattern = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(size))
        self.reset()

    def reset(self) -> None:
        self.path.write_bytes(self.pattern)

    def read(self) -> bytes:
        return self.path.read_bytes()


class Input:
    """A fuzzer input read front to back as small fields; past the end every
    field reads as zero (so any input is a valid program).  ``Script`` writes
    the same fields, which is how the targets build their seeds from real
    protocol traffic."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def pick(self, choices: Sequence[Any]) -> Any:
        return choices[self.u8() % len(choices)]

    def blob(self, limit: int) -> bytes:
        """A length (u16, taken modulo ``limit + 1``) and that many bytes."""
        return self.take(self.u16() % (limit + 1))


class Script:
    """Writes what ``Input`` reads."""

    def __init__(self) -> None:
        self.out = bytearray()

    def uint(self, size: int, value: int) -> Script:
        self.out += (value % (1 << (8 * size))).to_bytes(size, "little")
        return self

    def u8(self, value: int) -> Script:
        return self.uint(1, value)

    def u16(self, value: int) -> Script:
        return self.uint(2, value)

    def u32(self, value: int) -> Script:
        return self.uint(4, value)

    def u64(self, value: int) -> Script:
        return self.uint(8, value)

    def pick(self, choices: Sequence[Any], value: Any) -> Script:
        return self.u8(list(choices).index(value))

    def raw(self, data: bytes) -> Script:
        self.out += data
        return self

    def blob(self, data: bytes) -> Script:
        return self.u16(len(data)).raw(data)

    def data(self) -> bytes:
        return bytes(self.out)


def run(async_fn: Callable[..., Awaitable[None]], *args: Any, clock: trio.abc.Clock | None = None) -> None:
    """``trio.run``, with a lone exception out of nurseries raised as itself
    (so a finding's report shows the host's own traceback)."""
    try:
        trio.run(async_fn, *args, clock=clock)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out
