"""storvsc packets and their SCSI commands: the storvsp's Python path.

An input is a sequence of packets a guest puts on its request ring: the
packet type, flags, a GPA-direct page list (well-formed with fuzzed
ranges, or raw bytes) and a vstor packet whose operation, SRB fields and
CDB (a known opcode with fuzzed bytes, or any) are fuzzed.  They land in a
real ring pair in a sealed memfd; ``StorvspHost.serve`` (fast path off)
takes them until it waits for more; the target then reads the
completions as the guest would.

Invariants: every transactional request (in-band or GPA-direct, asking for
a completion) gets exactly one completion with its transaction id (in any
order: a refusal may overtake I/O), and nothing else is answered; a completion is a 64-byte COMPLETE_IO
packet with a known NTSTATUS, and for a successful SRB a known SRB status,
GOOD or CHECK CONDITION with valid sense, and no more bytes than asked;
guest RAM changes only in the rings and in pages the requests named; the
disk image changes only inside the blocks a WRITE names (or anywhere when
an UNMAP was sent); the device never fails with an exception.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import trio

from fuzz.rig import Input, Machine, ScratchDisk, Script, changed_ranges, check, inside, no_fd_left_open, run
from host_drivers.storage.device import StorvspHost
from ring import IncomingRing, OutgoingRing, PacketType, RingError, RingFull
from ring._layout import GPA_DIRECT_HEADER, GPA_RANGE_HEAD
from vmbus.channel import Channel
from vmbus.guest_memory import PAGE_SIZE
from vmbus.protocols import storvsc as S

RING = 4096 + (16 << 10)  # each direction: control page and 16 KiB of data
DATA_PFN = 2 * RING // PAGE_SIZE
RAM_PAGES = DATA_PFN + 32
MAX_TRANSFER = 64 << 10
MAX_PACKETS = 24
DISK = ScratchDisk(256 << 10)
OPERATIONS = tuple(S.Operation)
OPCODES = tuple(S.Opcode)
PACKET_TYPES = (PacketType.DATA_USING_GPA_DIRECT, PacketType.DATA_INBAND, PacketType.COMPLETION)
WRITES = (S.Opcode.WRITE_6, S.Opcode.WRITE_10, S.Opcode.WRITE_16)
NT_STATUSES = frozenset(int(s) for s in S.NtStatus)
SRB_STATUSES = frozenset({S.SrbStatus.SUCCESS, S.SrbStatus.ERROR | S.SrbStatus.AUTOSENSE_VALID,
                          S.SrbStatus.INVALID_LUN})


@dataclass
class Request:
    """One packet as the guest wrote it."""

    ptype: int
    completion: bool
    trans_id: int
    header: bytes
    payload: bytes

    @property
    def transactional(self) -> bool:
        return self.completion and self.ptype in (PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT)

    @property
    def cdb(self) -> bytes:
        return self.payload[12 + 16 : 12 + 32] if len(self.payload) >= 44 else b""

    def named_pages(self) -> set[int]:
        """Every aligned 64-bit word of the page list, as a page number: a
        superset of the pages any reading of it could name."""
        return {struct.unpack_from("<Q", self.header, off)[0] for off in range(8, len(self.header) - 7, 8)}


def page_list(inp: Input) -> bytes:
    if inp.u8() & 0x80:
        return inp.blob(256)
    ranges = 1 if inp.u8() < 0xF0 else inp.u8() % 4
    out = GPA_DIRECT_HEADER.pack(0, ranges)
    for _ in range(ranges):
        count, offset = inp.u32() if inp.u8() & 1 else inp.u16(), inp.u16() % (PAGE_SIZE + 1)
        pages = inp.u8() % 20
        first = DATA_PFN + inp.u8() % 40
        out += GPA_RANGE_HEAD.pack(count, offset) + struct.pack(f"<{pages}Q", *range(first, first + pages))
    return out


def cdb(inp: Input) -> bytes:
    which = inp.u8()
    op = OPCODES[which % len(OPCODES)] if which < 0xF0 else inp.u8()
    rest = inp.take(15).ljust(15, b"\0")
    if inp.u8() & 1 and op in (S.Opcode.READ_16, S.Opcode.WRITE_16, S.Opcode.READ_10, S.Opcode.WRITE_10):
        return S.read_write_cdb(op in WRITES, inp.u16(), inp.u8(), fua=bool(rest[0] & 8))  # near the disk
    return bytes([op]) + rest


def request(inp: Input, trans_id: int) -> Request:
    flags = inp.u8()
    ptype = PACKET_TYPES[flags % 3] if flags < 0xF0 else inp.u16()
    header = page_list(inp) if ptype == PacketType.DATA_USING_GPA_DIRECT else b""
    which = inp.u8()
    operation = S.Operation.EXECUTE_SRB if which < 0x80 else OPERATIONS[(which - 0x80) % len(OPERATIONS)]
    if operation == S.Operation.EXECUTE_SRB and which < 0x80:
        command = cdb(inp)
        transfer = inp.u32() % (MAX_TRANSFER + 2) if inp.u8() & 1 else inp.u16()
        srb = bytearray(S.scsi_request(command, bool(which & 1), transfer, lun=inp.u8() % 2))
        srb[8] = len(command) if which & 2 else inp.u8()  # cdb_length (byte 8 of the SRB)
        body = bytes(srb)
    else:
        body = inp.take(52)
    payload = struct.pack("<III", operation, inp.u8(), 0) + body.ljust(52, b"\0")
    if inp.u8() == 0xFF:
        payload = payload[: inp.u8()]
    return Request(ptype, not flags & 0x40, trans_id, header, payload)


def write_requests(ring: OutgoingRing, requests: list[Request]) -> list[Request]:
    """Put them on the guest's request ring; returns those that fit."""
    sent = []
    for r in requests:
        try:
            ring.write(r.payload, trans_id=r.trans_id, completion_requested=r.completion, packet_type=r.ptype,
                       header=r.header)
        except (RingFull, ValueError):
            break
        sent.append(r)
    ring.commit()
    return sent


def written_blocks(r: Request) -> tuple[int, int] | None:
    """(first byte, end byte) of the disk a WRITE CDB names, decoded here on
    its own (a second reading of SBC-3, not the device's)."""
    c = r.cdb.ljust(16, b"\0")
    if c[0] == S.Opcode.WRITE_6:
        lba, blocks = ((c[1] & 0x1F) << 16) | (c[2] << 8) | c[3], c[4] or 256
    elif c[0] == S.Opcode.WRITE_10:
        lba, blocks = struct.unpack_from(">I", c, 2)[0], struct.unpack_from(">H", c, 7)[0]
    elif c[0] == S.Opcode.WRITE_16:
        lba, blocks = struct.unpack_from(">QI", c, 2)
    else:
        return None
    return lba * 512, (lba + blocks) * 512


def check_completions(sent: list[Request], completions: list[tuple[int, int, bytes]]) -> None:
    expected = {r.trans_id: r for r in sent if r.transactional}
    ids = [t for t, _, _ in completions]
    check(sorted(ids) == sorted(expected), f"completions {ids} for requests {sorted(expected)}")
    for trans_id, ptype, payload in completions:
        r = expected[trans_id]
        check(ptype == PacketType.COMPLETION and len(payload) >= S.PACKET_SIZE, "completion is not a vstor packet")
        operation, _, status = struct.unpack_from("<III", payload)
        check(operation == S.Operation.COMPLETE_IO and status in NT_STATUSES, f"completion {operation}/{status:#x}")
        is_srb = len(r.payload) >= S.PACKET_SIZE and struct.unpack_from("<I", r.payload)[0] == S.Operation.EXECUTE_SRB
        if status or not is_srb:
            continue
        srb = S.SCSI_REQUEST.unpack_from(payload, 12)
        asked = S.SCSI_REQUEST.unpack_from(r.payload, 12)[11]
        check(srb[1] in SRB_STATUSES and srb[2] in (S.ScsiStatus.GOOD, S.ScsiStatus.CHECK_CONDITION),
              f"SRB status {srb[1]:#x}, SCSI status {srb[2]:#x}")
        check(srb[11] <= asked, f"{srb[11]} bytes reported moved, {asked} asked")
        if srb[2] == S.ScsiStatus.CHECK_CONDITION:
            key, asc, _ = S.parse_sense(srb[12])
            check(key in set(S.SenseKey) and asc, f"CHECK CONDITION with sense {srb[12].hex()}")


def check_effects(sent: list[Request], ram_before: bytes, ram_after: memoryview, disk_before: bytes,
                  disk_after: bytes) -> None:
    allowed = [(0, 2 * RING)]
    for r in sent:
        allowed += [(p * PAGE_SIZE, (p + 1) * PAGE_SIZE) for p in r.named_pages() if p < RAM_PAGES]
    changed = changed_ranges(ram_before, ram_after)
    check(inside(changed, allowed), f"guest RAM written at {changed}, outside the rings and named pages")
    if any(r.cdb[:1] == bytes([S.Opcode.UNMAP]) for r in sent):
        return
    writes = [w for r in sent if (w := written_blocks(r))]
    changed = changed_ranges(disk_before, disk_after, granule=512)
    check(inside(changed, writes), f"disk written at {changed}, outside every WRITE's blocks {writes}")


async def serve_until_idle(host: StorvspHost, machine: Machine) -> list[tuple[int, int, bytes]] | None:
    """Run the device on the host side of the rings until it waits for the
    guest; returns the completions as (trans_id, type, payload), or None if
    the device stopped on a ring the guest broke (a packet type the ring
    does not know)."""
    view = machine.memory.view(0, 2 * RING)
    idle = trio.Event()

    async def wait() -> None:
        idle.set()
        await trio.sleep_forever()

    channel = Channel(1, OutgoingRing(view, RING, RING), IncomingRing(view, 0, RING), lambda: None, wait)
    async def serve() -> None:
        try:
            await host.serve(channel, machine.memory)
        except RingError:  # the documented end of a channel whose guest broke its ring
            ring_broken.append(True)
            idle.set()

    ring_broken: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await idle.wait()
        nursery.cancel_scope.cancel()
    if ring_broken:
        return None
    guest_in = IncomingRing(machine.buf, RING, RING)
    out = []
    while (pkt := guest_in.read_packet()) is not None:
        out.append((pkt.trans_id, pkt.type, bytes(pkt.payload)))
    return out


def guest_rings(machine: Machine) -> OutgoingRing:
    OutgoingRing(machine.buf, RING, RING, format=True)  # the completion ring, empty
    return OutgoingRing(machine.buf, 0, RING, format=True)


async def drive(requests: list[Request]) -> None:
    machine = Machine(RAM_PAGES)
    host = StorvspHost({"path": str(DISK.path), "fast_path": False, "max_transfer": MAX_TRANSFER})
    try:
        machine.buf[DATA_PFN * PAGE_SIZE :] = os.urandom((RAM_PAGES - DATA_PFN) * PAGE_SIZE)
        # initialise the device first, as every guest does
        init = [Request(PacketType.DATA_INBAND, True, 0x10000 + i, b"", S.packet(op))
                for i, op in enumerate((S.Operation.BEGIN_INITIALIZATION, S.Operation.END_INITIALIZATION))]
        sent = write_requests(guest_rings(machine), init + requests)
        ram_before, disk_before = bytes(machine.ram.buf), DISK.read()
        completions = await serve_until_idle(host, machine)
        if completions is not None:
            check_completions(sent, completions)
        check_effects(sent, ram_before, machine.buf, disk_before, DISK.read())
        check(not sum(1 for k in host.errors if k.startswith("internal")), "the device failed")
    finally:
        await host.close()
        await machine.close()


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    requests = []
    while inp.left and len(requests) < MAX_PACKETS:
        requests.append(request(inp, len(requests) + 1))
    DISK.reset()
    with no_fd_left_open():
        run(drive, requests)


def write_request(s: Script, command: bytes, data_in: bool, transfer: int, pfn: int) -> None:
    """A regular GPA-direct SRB, in the fields ``request`` reads."""
    pages = (transfer + PAGE_SIZE - 1) // PAGE_SIZE
    s.u8(0)  # GPA-direct, completion requested
    s.u8(0).u8(0).u8(0).u16(transfer).u16(0).u8(pages).u8(pfn - DATA_PFN)
    s.u8(0x02 | int(data_in))  # EXECUTE_SRB, direction, CDB length from the CDB
    op = command[0]
    s.u8(OPCODES.index(op)).raw(command[1:16].ljust(15, b"\0")).u8(0)
    s.u8(0).u16(transfer).u8(0).u8(0).u8(0)


def seeds() -> list[bytes]:
    """Reads and writes of each size, INQUIRY, READ CAPACITY, MODE SENSE,
    a flush, REPORT LUNS and an UNMAP (its parameter list is in RAM)."""
    s = Script()
    write_request(s, S.read_write_cdb(True, 8, 8), False, 4096, DATA_PFN)
    write_request(s, S.read_write_cdb(False, 8, 8), True, 4096, DATA_PFN + 2)
    write_request(s, struct.pack(">BBIBHB", S.Opcode.WRITE_10, 0, 3, 0, 2, 0), False, 1024, DATA_PFN + 4)
    write_request(s, bytes([S.Opcode.READ_6, 0, 0, 5, 1, 0]), True, 512, DATA_PFN + 5)
    write_request(s, bytes([S.Opcode.INQUIRY, 1, 0xB0, 0, 64, 0]), True, 64, DATA_PFN + 6)
    write_request(s, bytes([S.Opcode.READ_CAPACITY_10]) + bytes(9), True, 8, DATA_PFN + 7)
    write_request(s, bytes([S.Opcode.SERVICE_ACTION_IN_16, S.READ_CAPACITY_16_ACTION]) + bytes(8)
                  + struct.pack(">I", 32) + bytes(2), True, 32, DATA_PFN + 8)
    write_request(s, bytes([S.Opcode.MODE_SENSE_6, 0, 0x08, 0, 64, 0]), True, 64, DATA_PFN + 9)
    write_request(s, bytes([S.Opcode.REPORT_LUNS]) + bytes(5) + struct.pack(">I", 16) + bytes(2), True, 16,
                  DATA_PFN + 10)
    write_request(s, bytes([S.Opcode.UNMAP]) + bytes(6) + struct.pack(">H", 24) + bytes(1), False, 24, DATA_PFN + 11)
    flush_srb = S.scsi_request(bytes([S.Opcode.SYNCHRONIZE_CACHE_10]) + bytes(9), False, 0)
    flush = Script().u8(1).u8(0x80 + OPERATIONS.index(S.Operation.EXECUTE_SRB)).raw(flush_srb).u8(0).u8(0)
    control = Script()
    for op in (S.Operation.QUERY_PROTOCOL_VERSION, S.Operation.QUERY_PROPERTIES, S.Operation.CREATE_SUB_CHANNELS):
        body = S.PROTOCOL_VERSION.pack(S.ProtocolVersion.WIN10, 0) if op == S.Operation.QUERY_PROTOCOL_VERSION else b""
        control.u8(1).u8(0x80 + OPERATIONS.index(op)).raw(body.ljust(52, b"\0")).u8(0).u8(0)
    return [s.data(), flush.data(), control.data()]
