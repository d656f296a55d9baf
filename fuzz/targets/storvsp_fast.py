"""storvsc packets through the storvsp's C fast path (``pv_serve`` with ``storvsp_handle``).

The packets are the storvsp target's (same generator); they go one at a
time onto a real ring pair in a sealed memfd, and the host's C serves them
over real shared memory and a real image file, as
``tests/storage/test_fastpath.py`` drives it (``stop_fd`` rung so it
returns instead of sleeping).

Invariants, against a model of what counts as regular written here from
the documented rule (``csrc/storvsp_fast.c``): a regular request is served
(never punted) and its completion is the request's vstor packet echoed
with COMPLETE_IO, SRB SUCCESS, GOOD, no sense, the CDB cleared and the
transfer length, byte for byte; its data moved exactly (a read leaves the
image's bytes in the named guest pages, a write leaves the guest's bytes in
the image); any other request is left unread at the head of the ring, with
no completion and not one byte of guest RAM or of the image changed; the
ring is never reported corrupt (the guest wrote it with the real writer).
"""

from __future__ import annotations

import os
import struct

from fuzz.rig import GuestRam, Input, changed_ranges, check, inside, no_fd_left_open
from fuzz.targets import storvsp
from fuzz.targets.storvsp import DATA_PFN, DISK, MAX_PACKETS, MAX_TRANSFER, RAM_PAGES, RING, Request
from host_drivers.storage._storvsp_c import ffi, lib
from host_drivers.storage.backend import DiskImage
from ring import IncomingRing, OutgoingRing, PacketType
from vmbus.guest_memory import PAGE_SIZE
from vmbus.protocols import storvsc as S

BLOCK = 512
MAX_IOV = 260  # csrc/storvsp_fast.c
PACKET_MAX = 16 + 16 + 8 * 264 + S.PACKET_SIZE + 64
KNOWN_TYPES = (PacketType.DATA_INBAND, PacketType.DATA_USING_XFER_PAGES, PacketType.DATA_USING_GPA_DIRECT,
               PacketType.COMPLETION)


class RingRefused(Exception):
    """The host's ring reader refused the packet: the channel is over."""


def pad8(n: int) -> int:
    return (n + 7) & ~7


def regular(r: Request, blocks_on_disk: int, read_only: bool = False) -> tuple[bool, list[tuple[int, int]], int, bool]:
    """Whether the C path must serve ``r``; if so also the guest byte
    ranges of its data, the image offset and whether it writes."""
    no = (False, [], 0, False)
    payload = r.payload.ljust(pad8(len(r.payload)), b"\0")
    if r.ptype != PacketType.DATA_USING_GPA_DIRECT or not r.completion:
        return no
    if 16 + len(r.header) + len(payload) > PACKET_MAX or len(payload) < S.PACKET_SIZE or len(r.header) < 16:
        return no
    operation = struct.unpack_from("<I", payload)[0]
    srb = S.SCSI_REQUEST.unpack_from(payload, 12)
    cdb_len, data_in, transfer, cdb = srb[7], srb[9], srb[11], srb[12]
    if operation != S.Operation.EXECUTE_SRB or not 1 <= cdb_len <= 16 or srb[4] or srb[5] or srb[6]:
        return no
    if not 1 <= transfer <= MAX_TRANSFER:
        return no
    if cdb[0] in (S.Opcode.READ_10, S.Opcode.WRITE_10) and cdb_len >= 10:
        lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
    elif cdb[0] in (S.Opcode.READ_16, S.Opcode.WRITE_16) and cdb_len >= 16:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    else:
        return no
    write = cdb[0] in (S.Opcode.WRITE_10, S.Opcode.WRITE_16)
    if write == (data_in == S.DATA_IN) or (write and read_only):
        return no
    if lba > blocks_on_disk or blocks > blocks_on_disk - lba or blocks * BLOCK != transfer:
        return no
    _, count = struct.unpack_from("<II", r.header)
    byte_count, offset = struct.unpack_from("<II", r.header, 8)
    if count != 1 or byte_count < transfer or offset >= PAGE_SIZE:
        return no
    npfns = (len(r.header) - 16) // 8
    needed = (offset + transfer + PAGE_SIZE - 1) // PAGE_SIZE
    if needed > npfns:
        return no
    pfns = struct.unpack_from(f"<{needed}Q", r.header, 16)
    if any(p >= RAM_PAGES for p in pfns):
        return no
    runs = 1 + sum(1 for a, b in zip(pfns, pfns[1:], strict=False) if b != a + 1)
    if runs > MAX_IOV:
        return no
    spans, left, first = [], transfer, offset
    for p in pfns:
        n = min(left, PAGE_SIZE - first)
        spans.append((p * PAGE_SIZE + first, p * PAGE_SIZE + first + n))
        left, first = left - n, 0
    return True, spans, lba * BLOCK, write


def expected_completion(r: Request, transfer: int) -> bytes:
    vp = bytearray(r.payload[: S.PACKET_SIZE])
    srb = list(S.SCSI_REQUEST.unpack_from(vp, 12))
    srb[1], srb[2], srb[8], srb[11], srb[12] = S.SrbStatus.SUCCESS, S.ScsiStatus.GOOD, 0, transfer, bytes(20)
    return struct.pack("<III", S.Operation.COMPLETE_IO, S.REQUEST_COMPLETION_FLAG, 0) + S.SCSI_REQUEST.pack(*srb)


class Rig:
    """Guest rings, host rings and the C queue over one guest RAM."""

    def __init__(self, machine: GuestRam, disk: DiskImage) -> None:
        self.machine = machine
        self.guest_out = OutgoingRing(machine.buf, 0, RING, format=True)
        self.guest_in = IncomingRing(machine.buf, RING, RING, format=True)
        view = machine.memory.view(0, 2 * RING)
        self.host_in, self.host_out = IncomingRing(view, 0, RING), OutgoingRing(view, RING, RING)
        d = self.d = ffi.new("storvsp_disk *")
        d.ram = ffi.cast("uint8_t *", machine.memory.c_address)
        d.ram_pages = machine.memory.pages
        d.disk_fd, d.block_size, d.blocks = disk.fd, disk.block_size, disk.blocks
        d.max_transfer, d.read_only = MAX_TRANSFER, int(disk.read_only)
        q = self.q = ffi.new("pv_server *")
        q.inbound = ffi.cast("pv_ring *", self.host_in.c_address)
        q.outbound = ffi.cast("pv_ring *", self.host_out.c_address)
        q.handle, q.ctx, q.room_needed = ffi.addressof(lib, "storvsp_handle"), d, lib.STORVSP_ROOM_NEEDED
        q.signal_fd, q.spin_us = -1, 0
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        q.kick_fd, q.stop_fd = self.kick, self.stop

    def serve(self) -> int:
        os.eventfd_write(self.stop, 1)
        while True:
            rc = lib.pv_serve(self.q)
            if rc & ~lib.PV_SERVE_SIGNAL:
                return int(rc)

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.stop)
        # The rings export views of the mapping: drop them so it can be unmapped.
        del self.guest_out, self.guest_in, self.host_in, self.host_out, self.q, self.d


def one(rig: Rig, disk: DiskImage, r: Request) -> None:
    if not storvsp.write_requests(rig.guest_out, [r]):
        return  # the ring writer refused it (a header not a multiple of 8): nothing was sent
    is_regular, spans, disk_offset, write = regular(r, disk.blocks, disk.read_only)
    transfer = sum(b - a for a, b in spans)
    ram_before, disk_before = bytes(rig.machine.ram.buf), DISK.read()
    served_before = int(rig.d.requests)
    rc = rig.serve()
    if r.ptype not in KNOWN_TYPES:  # the writer frames any type; the reader refuses unknown ones
        check(rc & lib.PV_SERVE_CORRUPT and rig.host_in.corrupt, f"unknown packet type {r.ptype} not refused")
        check(inside(changed_ranges(ram_before, rig.machine.ram.buf), [(0, 2 * RING)]), "RAM changed on a bad ring")
        check(DISK.read() == disk_before, "image changed on a bad ring")
        raise RingRefused
    check(not rc & lib.PV_SERVE_CORRUPT, f"ring reported corrupt ({rc:#x}) on a packet the real writer wrote")
    if not is_regular:
        check(rc == lib.PV_SERVE_PUNT and rig.d.requests == served_before, f"irregular request served (rc {rc:#x})")
        check(inside(changed_ranges(ram_before, rig.machine.ram.buf), [(0, 2 * RING)]),
              "guest RAM changed outside the rings for a punted request")
        check(DISK.read() == disk_before, "image changed for a punted request")
        pkt = rig.host_in.read_packet()
        check(pkt is not None and pkt.trans_id == r.trans_id, "punted request not left at the head of the ring")
        rig.host_in.commit()
        check(rig.guest_in.read_packet() is None, "completion written for a punted request")
        return
    check(rc == lib.PV_SERVE_STOPPED and rig.d.requests == served_before + 1, f"regular request punted (rc {rc:#x})")
    after = bytes(rig.machine.ram.buf)
    data = b"".join(after[a:b] for a, b in spans)
    image = DISK.read()
    check(image[disk_offset : disk_offset + transfer] == data, "data moved wrongly between RAM and image")
    if write:
        check(inside(changed_ranges(ram_before, after), [(0, 2 * RING)]),
              "a write changed guest RAM outside the rings")
        check(inside(changed_ranges(disk_before, image, 512), [(disk_offset, disk_offset + transfer)]),
              "a write changed the image outside its blocks")
    else:
        check(image == disk_before, "a read changed the image")
        check(inside(changed_ranges(ram_before, after), [(0, 2 * RING), *spans]), "a read wrote outside its pages")
    pkt = rig.guest_in.read_packet()
    check(pkt is not None and pkt.trans_id == r.trans_id and pkt.type == PacketType.COMPLETION, "no completion")
    check(bytes(pkt.payload) == expected_completion(r, transfer), "completion differs from the documented bytes")
    rig.guest_in.commit()


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    requests = []
    while inp.left and len(requests) < MAX_PACKETS:
        requests.append(storvsp.request(inp, len(requests) + 1))
    DISK.reset()
    with no_fd_left_open():
        machine = GuestRam(RAM_PAGES)
        machine.buf[DATA_PFN * PAGE_SIZE :] = os.urandom((RAM_PAGES - DATA_PFN) * PAGE_SIZE)
        disk = DiskImage(str(DISK.path), read_only=data[-1:] == b"\xff")  # an input ending in 0xFF: a read-only disk
        rig = Rig(machine, disk)
        try:
            for r in requests:
                one(rig, disk, r)
        except RingRefused:
            pass
        finally:
            rig.close()
            disk.close()
            machine.close()


def seeds() -> list[bytes]:
    return storvsp.seeds()
