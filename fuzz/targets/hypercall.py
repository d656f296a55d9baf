"""Exit frames: ``Partition.handle_exit`` with the VMBus server behind it.

An input is a sequence of exits a guest sends on its control socket: raw
datagrams, MSR writes (SIMP, SIEFP, EOM or any), hypercalls with fuzzed
control words and input blocks, well-framed HvPostMessage calls with
fuzzed fields, trapped I/O to addresses no device decodes, and pauses in
which the guest takes its messages out of the SynIC slot.

Invariants: every exit gets a reply of the size its kind expects carrying
an HV_STATUS, fds only with a successful CONNECT_EVENT_PORT; no exception
escapes; the host writes guest RAM only in the SynIC message slot of the
SIMP page and the SINT's event flags of the SIEFP page (the pages the
guest named, before or after the exit); the host sends only well-formed
host-to-guest messages; no descriptor is left open.
"""

from __future__ import annotations

import struct

import trio

import host_drivers.echo  # noqa: F401 - imported here so it is instrumented
from fuzz.rig import Input, Machine, Script, changed_ranges, check, inside, no_fd_left_open, run
from pvbus.devices import ECHO
from vmbus import hv
from vmbus import protocol as P
from vmbus.guest_memory import PAGE_SIZE
from vmbus.hypervisor import FLAGS_OFFSET, SLOT_OFFSET
from vmbus.transport import CONTROL_WORD, IO_BODY, KIND, MAX_DATAGRAM, WRMSR_BODY, ExitKind

RAM_PAGES = 16
MSRS = (hv.HV_X64_MSR_SIMP, hv.HV_X64_MSR_SIEFP, hv.HV_X64_MSR_EOM)
CODES = (hv.HvCall.POST_MESSAGE, hv.HvCall.SIGNAL_EVENT, hv.HvCall.CONNECT_EVENT_PORT)
RAW, MSR, HYPERCALL, POST, IO, DRAIN = range(6)
MAX_EXITS = 48


def synic_areas(machine: Machine) -> list[tuple[int, int]]:
    p = machine.partition
    out = []
    if p.simp is not None:
        out.append((p.simp + SLOT_OFFSET, p.simp + SLOT_OFFSET + hv.HV_MESSAGE_SIZE))
    if p.siefp is not None:
        out.append((p.siefp + FLAGS_OFFSET, p.siefp + FLAGS_OFFSET + hv.EVENT_FLAGS_BYTES_PER_SINT))
    return out


def frame(inp: Input) -> bytes | None:
    """One exit datagram, or None for a pause to take messages."""
    op = inp.u8() % 6
    if op == RAW:
        return inp.blob(MAX_DATAGRAM)
    if op == MSR:
        which = inp.u8()
        msr = MSRS[which % 3] if which < 0xF0 else inp.u32()
        value = inp.u64() if inp.u8() & 1 else (inp.u8() * PAGE_SIZE) | hv.MSR_ENABLE
        return KIND.pack(ExitKind.WRMSR) + WRMSR_BODY.pack(msr, value)
    if op == HYPERCALL:
        which = inp.u8()
        code = CODES[which % 3] if which < 0xF0 else inp.u16()
        flags = inp.u8()
        word = hv.control_word(code, fast=bool(flags & 1), rep_count=flags >> 1)
        return KIND.pack(ExitKind.HYPERCALL) + CONTROL_WORD.pack(word) + inp.blob(MAX_DATAGRAM)
    if op == POST:
        conn, mtype, size = inp.u32(), inp.u8(), inp.u8()
        block = hv.POST_MESSAGE_INPUT.pack(conn, 0, mtype, size, inp.blob(hv.MESSAGE_PAYLOAD_MAX))
        return KIND.pack(ExitKind.HYPERCALL) + CONTROL_WORD.pack(hv.control_word(hv.HvCall.POST_MESSAGE)) + block
    if op == IO:
        return KIND.pack(ExitKind.IO) + IO_BODY.pack(inp.u32(), inp.u8(), inp.u8() & 1, 0, inp.u64())
    return None


async def drive(frames: list[bytes | None]) -> None:
    machine = Machine(RAM_PAGES)
    try:
        async with trio.open_nursery() as nursery:
            machine.start_bus(nursery, [ECHO])
            for data in frames:
                if data is None:
                    await machine.drain_messages()
                    continue
                areas = synic_areas(machine)
                before = bytes(machine.ram.buf)
                await machine.exit(data)
                areas += synic_areas(machine)
                changed = changed_ranges(before, machine.ram.buf)
                check(inside(changed, areas), f"host wrote guest RAM at {changed} outside the SynIC areas {areas}")
            check(not machine.partition.rejected.get("device"), "a device failed on guest input")
            nursery.cancel_scope.cancel()
    finally:
        await machine.close()


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    frames = []
    while inp.left and len(frames) < MAX_EXITS:
        frames.append(frame(inp))
    with no_fd_left_open():
        run(drive, frames)


def _msr(s: Script, which: int, pfn: int) -> None:
    s.u8(MSR).u8(which).u8(0).u8(pfn)


def _post(s: Script, msg: P.Message, conn: int = hv.VMBUS_MESSAGE_CONNECTION_ID_4) -> None:
    raw = msg.encode()
    s.u8(POST).u32(conn).u8(hv.VMBUS_MESSAGE_TYPE).u8(len(raw)).blob(raw)


def seeds() -> list[bytes]:
    """SynIC set up, contact and offers taken, a signal, an event port
    request, an EOM and an I/O exit; plus each exit kind alone."""
    s = Script()
    _msr(s, 0, 0)
    _msr(s, 1, 1)
    _post(s, P.InitiateContact(P.Version.WIN10_V5_3, 0, hv.VMBUS_MESSAGE_SINT))
    s.u8(DRAIN)
    _post(s, P.RequestOffers())
    s.u8(DRAIN)
    s.u8(HYPERCALL).u8(1).u8(0).blob(hv.SIGNAL_EVENT_INPUT.pack(0x2001, 0, 0))
    s.u8(HYPERCALL).u8(2).u8(0).blob(struct.pack("<I", 0x2001))
    _msr(s, 2, 0)
    s.u8(IO).u32(0x1F7).u8(1).u8(0).u64(0)
    out = [s.data()]
    out.append(Script().u8(RAW).blob(KIND.pack(ExitKind.CONNECT) + bytes(8)).data())
    out.append(Script().u8(HYPERCALL).u8(0xF5).u16(0x99).u8(3).blob(bytes(16)).data())
    return out
