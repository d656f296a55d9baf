"""The storage C fast paths, driven directly on real shared memory and a real file.

Guest RAM is a sealed memfd; the host sees it through ``GuestMemory``; the
two rings lie at its start; the disk is an image file.  The guest's C
builds requests (``storvsc_stage``) and reaps completions
(``storvsc_reap``); the host's C serves them (the queue layer's ``pv_serve``
with the storvsp's handler ``storvsp_handle``).  Pinned
here: the C wire layout equals the Python structs, both C builders write
exactly the bytes the Python path would, data lands where it should, and
anything the host's C does not serve is left unread for Python.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from guest_kernel.drivers._storvsc_c import ffi as gffi
from guest_kernel.drivers._storvsc_c import lib as glib
from host_drivers.storage._storvsp_c import ffi as hffi
from host_drivers.storage._storvsp_c import lib as hlib
from host_drivers.storage.backend import DiskImage
from host_drivers.storage.device import StorvspHost
from ring import GpaRange, IncomingRing, OutgoingRing, PacketType, SharedMemory
from ring._api import encode_gpa_direct_header
from vmbus.guest_memory import GuestMemory
from vmbus.protocols import storvsc as S

RAM = 4 << 20
RING = 4096 + (64 << 10)
DISK = 1 << 20
DATA_PFN = 2 * RING // 4096  # first page after the two rings
MAX_TRANSFER = 256 << 10


class Reaped(NamedTuple):
    """One completion the guest's C reaper decoded, copied out of its array."""

    trans_id: int
    type: int
    ok: bool
    transferred: int
    payload: bytes


@dataclass
class Rig:
    shm: SharedMemory
    memory: GuestMemory
    disk: DiskImage
    path: Path
    guest_out: OutgoingRing  # requests, guest side
    guest_in: IncomingRing  # completions, guest side
    host_in: IncomingRing
    host_out: OutgoingRing
    q: Any  # the pv_server
    disk_state: Any  # the handler's storvsp_disk
    stop_fd: int
    kick_fd: int

    def page(self, pfn: int, count: int = 1) -> memoryview:
        return memoryview(self.shm.buf)[pfn * 4096 : (pfn + count) * 4096]

    def stage(self, *ios: tuple[bool, bool, int, int, int, int]) -> None:
        """(write, fua, lba, blocks, pfn, trans_id) each; then publish."""
        arr = gffi.new("storvsc_io[]", len(ios))
        for io, (write, fua, lba, blocks, pfn, tid) in zip(arr, ios, strict=True):
            io.write, io.fua, io.lba, io.blocks, io.pfn, io.trans_id = write, fua, lba, blocks, pfn, tid
        staged, needed = gffi.new("uint32_t *"), gffi.new("uint32_t *")
        rc = glib.storvsc_stage(gffi.cast("pv_ring *", self.guest_out.c_address), 512, arr, len(ios), staged, needed)
        assert rc == glib.PV_OK and staged[0] == len(ios)
        self.guest_out.commit()

    def serve(self) -> int:
        """Run the host C until it returns for something other than a signal;
        with ``stop_fd`` rung it returns STOPPED instead of sleeping."""
        os.eventfd_write(self.stop_fd, 1)
        while True:
            rc = hlib.pv_serve(self.q)
            if rc & ~hlib.PV_SERVE_SIGNAL:
                return int(rc)

    def reap(self) -> list[Any]:
        done = gffi.new("storvsc_completion[]", 256)
        n = gffi.new("uint32_t *")
        rc = glib.storvsc_reap(gffi.cast("pv_ring *", self.guest_in.c_address), done, 256, n)
        assert rc in (glib.PV_OK, glib.PV_EMPTY)
        self.guest_in.commit()
        # Copied out: the array is freed when this returns (cdata items of it
        # would point into freed memory).
        return [Reaped(c.trans_id, c.type, bool(c.ok), c.transferred, bytes(gffi.buffer(c.payload, c.payload_len)))
                for c in (done[i] for i in range(n[0]))]


def _rig(tmp_path: Path, *, read_only: bool = False, completion_ring: int = RING) -> Rig:
    shm = SharedMemory.create(RAM)
    memory = GuestMemory(shm.fd, RAM)
    path = tmp_path / "disk.img"
    if not path.exists():
        path.write_bytes(os.urandom(DISK))
    disk = DiskImage(str(path), read_only=read_only)
    guest_out = OutgoingRing(shm.buf, 0, RING, format=True)
    guest_in = IncomingRing(shm.buf, RING, completion_ring, format=True)
    host_view = memory.view(0, RING + completion_ring)
    host_in = IncomingRing(host_view, 0, RING)
    host_out = OutgoingRing(host_view, RING, completion_ring)
    d = hffi.new("storvsp_disk *")
    d.ram = hffi.cast("uint8_t *", memory.c_address)
    d.ram_pages = memory.pages
    d.disk_fd, d.block_size, d.blocks = disk.fd, disk.block_size, disk.blocks
    d.max_transfer, d.read_only = MAX_TRANSFER, int(read_only)
    q = hffi.new("pv_server *")
    q.inbound = hffi.cast("pv_ring *", host_in.c_address)
    q.outbound = hffi.cast("pv_ring *", host_out.c_address)
    q.handle, q.ctx = hffi.addressof(hlib, "storvsp_handle"), d
    q.room_needed, q.signal_fd = hlib.STORVSP_ROOM_NEEDED, -1
    kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    q.kick_fd, q.stop_fd, q.spin_us = kick_fd, stop_fd, 0
    return Rig(shm, memory, disk, path, guest_out, guest_in, host_in, host_out, q, d, stop_fd, kick_fd)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = _rig(tmp_path)
    yield r
    _close(r)


def _close(r: Rig) -> None:
    os.close(r.kick_fd)
    os.close(r.stop_fd)
    r.disk.close()


def test_wire_layout_is_the_python_structs() -> None:
    fields = ["length", "srb_status", "scsi_status", "port", "path", "target", "lun", "cdb_length",
              "sense_info_length", "data_in", "reserved", "data_transfer_length", "cdb", "reserve", "queue_tag",
              "queue_action", "srb_flags", "time_out_value", "queue_sort_key"]
    fmt = S.SCSI_REQUEST.format.lstrip("<")
    codes = [c for c in struct.Struct("<" + fmt).format[1:].replace("20s", "s")]
    assert len(codes) == len(fields)
    expanded = fmt.replace("20s", "S")
    offset = 0
    for name, code in zip(fields, expanded, strict=True):
        assert gffi.offsetof("struct sv_srb", name) == offset, name
        offset += 20 if code == "S" else struct.calcsize("<" + code)
    assert gffi.sizeof("struct sv_srb") == S.SCSI_REQUEST_SIZE == offset
    assert gffi.sizeof("struct sv_packet") == S.PACKET_SIZE
    assert gffi.offsetof("struct sv_packet", "srb") == 12
    assert hffi.sizeof("storvsp_disk") > 0 and hlib.STORVSP_ROOM_NEEDED == 16 + S.PACKET_SIZE + 8 + 8


def test_guest_builds_the_bytes_the_python_driver_would(rig: Rig) -> None:
    rig.stage((False, False, 7, 8, DATA_PFN, 3), (True, True, 1 << 33, 520, DATA_PFN + 5, 9))
    for write, fua, lba, blocks, pfn, tid in ((False, False, 7, 8, DATA_PFN, 3),
                                             (True, True, 1 << 33, 520, DATA_PFN + 5, 9)):
        pkt = rig.host_in.read_packet()
        assert pkt is not None
        transfer = blocks * 512
        srb = S.scsi_request(S.read_write_cdb(write, lba, blocks, fua=fua), not write, transfer)
        assert (pkt.type, pkt.flags, pkt.trans_id) == (PacketType.DATA_USING_GPA_DIRECT, 1, tid)
        assert bytes(pkt.payload) == S.packet(S.Operation.EXECUTE_SRB, 0, srb)
        pages = range(pfn, pfn + (transfer + 4095) // 4096)
        assert bytes(pkt.header) == encode_gpa_direct_header([GpaRange(transfer, 0, pages)])
    assert rig.host_in.read_packet() is None


def test_host_moves_data_and_completes_byte_for_byte_like_python(rig: Rig) -> None:
    pattern = os.urandom(3 * 4096)
    rig.page(DATA_PFN, 3)[:] = pattern
    rig.stage((True, False, 40, 24, DATA_PFN, 1), (True, True, 100, 8, DATA_PFN + 2, 2))
    assert rig.serve() == hlib.PV_SERVE_STOPPED
    assert rig.disk_state.requests == 2 and rig.disk_state.bytes_written == 4 * 4096
    image = rig.path.read_bytes()
    assert image[40 * 512 : 40 * 512 + 3 * 4096] == pattern
    assert image[100 * 512 : 100 * 512 + 4096] == pattern[2 * 4096 :]

    rig.stage((False, False, 40, 24, DATA_PFN + 10, 5))
    assert rig.serve() == hlib.PV_SERVE_STOPPED
    assert bytes(rig.page(DATA_PFN + 10, 3)) == pattern

    done = rig.reap()
    assert [(c.trans_id, c.ok, c.transferred, c.type) for c in done] == [
        (1, 1, 3 * 4096, PacketType.COMPLETION), (2, 1, 4096, PacketType.COMPLETION),
        (5, 1, 3 * 4096, PacketType.COMPLETION)]
    request = S.SCSI_REQUEST.unpack(S.scsi_request(S.read_write_cdb(False, 40, 24), True, 3 * 4096))
    python_reply = S.packet(S.Operation.COMPLETE_IO, 0,
                            StorvspHost._srb_reply(request, S.SrbStatus.SUCCESS, 0, None, 3 * 4096))
    assert done[2].payload == python_reply


def _raw(rig: Rig, cdb: bytes, data_in: bool, transfer: int, *, pfns: list[int] | None = None,
         ranges: int = 1, lun: int = 0, byte_count: int | None = None, inband: bool = False) -> None:
    payload = S.packet(S.Operation.EXECUTE_SRB, 0, S.scsi_request(cdb, data_in, transfer, lun=lun))
    if inband:
        rig.guest_out.write(payload, trans_id=77, completion_requested=True)
    else:
        pages = pfns if pfns is not None else list(range(DATA_PFN, DATA_PFN + max(1, (transfer + 4095) // 4096)))
        rng = GpaRange(byte_count if byte_count is not None else transfer, 0, pages)
        header = encode_gpa_direct_header([rng] * ranges)
        rig.guest_out.write(payload, trans_id=77, completion_requested=True,
                            packet_type=PacketType.DATA_USING_GPA_DIRECT, header=header)
    rig.guest_out.commit()


IRREGULAR = {
    "inquiry": lambda r: _raw(r, bytes([S.Opcode.INQUIRY, 0, 0, 0, 36, 0]), True, 36),
    "flush": lambda r: _raw(r, bytes([S.Opcode.SYNCHRONIZE_CACHE_10]) + bytes(9), False, 0, inband=True),
    "lba beyond the end": lambda r: _raw(r, S.read_write_cdb(False, DISK // 512 - 4, 8), True, 4096),
    "pfn outside RAM": lambda r: _raw(r, S.read_write_cdb(False, 0, 8), True, 4096, pfns=[RAM // 4096]),
    "second page outside RAM": lambda r: _raw(r, S.read_write_cdb(False, 0, 16), True, 8192,
                                              pfns=[RAM // 4096 - 1, RAM // 4096]),
    "two ranges": lambda r: _raw(r, S.read_write_cdb(False, 0, 8), True, 4096, ranges=2),
    "range shorter than the transfer": lambda r: _raw(r, S.read_write_cdb(False, 0, 8), True, 4096, byte_count=512),
    "page list too short": lambda r: _raw(r, S.read_write_cdb(False, 0, 16), True, 8192, pfns=[DATA_PFN]),
    "transfer beyond the maximum": lambda r: _raw(r, S.read_write_cdb(False, 0, 1024), True, 1024 * 512),
    "count disagrees with the transfer": lambda r: _raw(r, S.read_write_cdb(False, 0, 4), True, 4096),
    "direction disagrees": lambda r: _raw(r, S.read_write_cdb(True, 0, 8), True, 4096),
    "another LUN": lambda r: _raw(r, S.read_write_cdb(False, 0, 8), True, 4096, lun=1),
}


@pytest.mark.parametrize("case", sorted(IRREGULAR))
def test_host_leaves_what_it_does_not_serve_unread_for_python(rig: Rig, case: str) -> None:
    before = rig.path.read_bytes()
    rig.page(DATA_PFN, 2)[:] = bytes(8192)
    IRREGULAR[case](rig)
    assert rig.serve() == hlib.PV_SERVE_PUNT
    assert rig.disk_state.requests == 0 and rig.q.punted == 1
    assert rig.reap() == []  # no completion written
    assert bytes(rig.page(DATA_PFN, 2)) == bytes(8192)  # nothing read into guest RAM
    assert rig.path.read_bytes() == before
    pkt = rig.host_in.read_packet()  # still at the head, for the Python path
    assert pkt is not None and pkt.trans_id == 77


def test_host_punts_writes_to_a_read_only_disk(tmp_path: Path) -> None:
    r = _rig(tmp_path)
    _close(r)
    r = _rig(tmp_path, read_only=True)
    try:
        before = r.path.read_bytes()
        r.stage((True, False, 0, 8, DATA_PFN, 4))
        assert r.serve() == hlib.PV_SERVE_PUNT
        assert r.path.read_bytes() == before and r.reap() == []
    finally:
        _close(r)


def test_host_reports_a_corrupt_ring(rig: Rig) -> None:
    struct.pack_into("<I", rig.shm.buf, 0, 12345)  # an unaligned write index in the request ring
    assert rig.serve() & hlib.PV_SERVE_CORRUPT
    assert rig.host_in.corrupt


def test_host_waits_for_room_for_completions_then_goes_on(tmp_path: Path) -> None:
    r = _rig(tmp_path, completion_ring=4096 + 4096)  # room for 46 completions of 88 bytes
    try:
        r.stage(*[(False, False, i * 8, 8, DATA_PFN + i, i + 1) for i in range(60)])
        assert r.serve() == hlib.PV_SERVE_STOPPED  # asleep waiting for room, woken by stop_fd
        first = r.disk_state.requests
        assert 40 <= first < 60 and r.q.ring_full_waits == 1
        assert struct.unpack_from("<I", r.shm.buf, RING + 12)[0] > 0  # the host armed pending_send_sz
        reaped = r.reap()
        assert [c.trans_id for c in reaped] == list(range(1, first + 1))
        assert r.serve() == hlib.PV_SERVE_STOPPED
        assert r.disk_state.requests == 60
        assert [c.trans_id for c in r.reap()] == list(range(first + 1, 61))
        image = r.path.read_bytes()
        for i in (0, 59):
            assert bytes(r.page(DATA_PFN + i)) == image[i * 4096 : (i + 1) * 4096]
    finally:
        _close(r)


def test_guest_queue_stays_masked_while_anyone_polls_and_rechecks_when_the_last_lets_go(rig: Rig) -> None:
    from guest_kernel.drivers.storvsc_queue import DiskQueue
    from vmbus.channel import Channel

    async def never() -> None:
        raise AssertionError("nothing here sleeps")

    queue = DiskQueue(Channel(1, rig.guest_out, rig.guest_in, lambda: None, never), capacity=8)

    def masked() -> bool:
        return bool(struct.unpack_from("<I", rig.shm.buf, RING + 8)[0] == 1)  # interrupt_mask of the completion ring

    first, second = object(), object()
    queue.poller.hold(first)
    queue.poller.hold(second)
    assert masked()
    queue.poller.let_go(first)
    assert masked()  # the second holder still polls
    # A completion lands while masked: the host need not (and does not) signal.
    rig.host_out.write(S.packet(S.Operation.COMPLETE_IO, 0, b""), trans_id=3, packet_type=PacketType.COMPLETION)
    assert rig.host_out.commit() is False
    queue.poller.let_go(second)
    assert not masked()
    # Letting go re-checked and reaped it (no request 3 is outstanding: a stray).
    assert queue.stray_completions == 1 and rig.guest_in.available == 0
    queue.poller.let_go(second)  # letting go twice changes nothing
    assert not masked() and queue.stray_completions == 1


def test_host_publishes_large_transfers_one_by_one_and_small_ones_in_a_batch(rig: Rig) -> None:
    def published() -> int:  # completions visible to the guest
        return rig.guest_in.available // (16 + S.PACKET_SIZE + 8)  # descriptor, vstor packet, trailer

    # Three 256 KiB reads: each completion is published as soon as its copy
    # is done (the guest may be waiting for just that one), with a signal.
    blocks = (256 << 10) // 512
    rig.stage(*[(False, False, 0, blocks, DATA_PFN + 64 * i, i + 1) for i in range(3)])
    assert hlib.pv_serve(rig.q) == hlib.PV_SERVE_SIGNAL
    assert rig.disk_state.requests == 1 and published() == 1
    assert rig.serve() == hlib.PV_SERVE_STOPPED
    assert [c.trans_id for c in rig.reap()] == [1, 2, 3]
    # Sixteen 4 KiB reads: served, then published with one index store.
    rig.stage(*[(False, False, i * 8, 8, DATA_PFN + i, 10 + i) for i in range(16)])
    assert hlib.pv_serve(rig.q) == hlib.PV_SERVE_SIGNAL
    assert rig.disk_state.requests == 19 and published() == 16


def test_letting_go_re_checks_after_its_own_reap(rig: Rig) -> None:
    """The race a single re-check loses: the host publishes a completion while
    our reap has taken the earlier one but not committed it, so the ring is
    not empty for the host and it does not signal; only a re-check after the
    commit finds the new one."""
    from guest_kernel.drivers.storvsc_queue import DiskQueue
    from vmbus.channel import Channel

    async def never() -> None:
        raise AssertionError("nothing here sleeps")

    channel = Channel(1, rig.guest_out, rig.guest_in, lambda: None, never)
    queue = DiskQueue(channel, capacity=8)
    completion = S.packet(S.Operation.COMPLETE_IO, 0, b"")
    holder = object()
    queue.poller.hold(holder)
    rig.host_out.write(completion, trans_id=3, packet_type=PacketType.COMPLETION)
    assert rig.host_out.commit() is False  # masked: no signal
    commit_read = channel.commit_read
    raced: list[bool] = []

    def host_publishes_before_our_commit(packets: int) -> None:
        if not raced:
            rig.host_out.write(completion, trans_id=4, packet_type=PacketType.COMPLETION)
            raced.append(rig.host_out.commit())
        commit_read(packets)

    channel.commit_read = host_publishes_before_our_commit  # type: ignore[method-assign]
    queue.poller.let_go(holder)
    assert raced == [False]  # the host saw a non-empty ring and did not signal
    assert rig.guest_in.available == 0 and queue.stray_completions == 2  # both reaped anyway


def test_the_publish_threshold_counts_bytes_since_the_last_publish(rig: Rig) -> None:
    """256 KiB is counted from the layer's last publish, not over the
    handler's life: after a published batch of small reads, a 192 KiB read
    and a 4 KiB one go out together in one publish."""
    rig.stage(*[(False, False, i * 8, 8, DATA_PFN + i, 100 + i) for i in range(32)])  # 128 KiB
    assert rig.serve() == hlib.PV_SERVE_STOPPED
    assert rig.q.publishes == 1 and len(rig.reap()) == 32
    rig.stage((False, False, 0, (192 << 10) // 512, DATA_PFN, 200), (False, False, 8, 8, DATA_PFN + 60, 201))
    assert rig.serve() == hlib.PV_SERVE_STOPPED
    assert rig.q.publishes == 2 and [c.trans_id for c in rig.reap()] == [200, 201]
    # And a run that does reach 256 KiB is published at once, alone.
    rig.stage((False, False, 0, (256 << 10) // 512, DATA_PFN, 300), (False, False, 8, 8, DATA_PFN + 70, 301))
    assert rig.serve() == hlib.PV_SERVE_STOPPED
    assert rig.q.publishes == 4 and [c.trans_id for c in rig.reap()] == [300, 301]
