"""SCSI commands against a ``DiskImage``: the disk the guest sees.

``execute`` takes one CDB plus the guest pages of its data buffer (as
views from ``GuestMemory.iovec``) and returns a ``ScsiResult``: GOOD with
the bytes moved, or CHECK CONDITION with fixed-format sense.  It runs in
a worker thread (every command may touch the file).  The commands are
the ones a Linux guest's sd driver uses on a storvsc disk: INQUIRY (with
the VPD pages for block limits and thin provisioning), TEST UNIT READY,
READ CAPACITY 10/16, READ/WRITE 6/10/16 (FUA honoured), SYNCHRONIZE CACHE,
UNMAP, MODE SENSE 6/10 (caching page, write-protect bit) and REPORT LUNS.
Values follow SPC-4/SBC-3.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vmbus.protocols import storvsc as S

from .backend import DiskImage

MAX_UNMAP_DESCRIPTORS = 64


@dataclass(frozen=True)
class ScsiResult:
    status: int
    sense: tuple[int, int, int] | None
    transferred: int

    @classmethod
    def good(cls, transferred: int = 0) -> ScsiResult:
        return cls(S.ScsiStatus.GOOD, None, transferred)

    @classmethod
    def check(cls, sense: tuple[int, int, int]) -> ScsiResult:
        return cls(S.ScsiStatus.CHECK_CONDITION, sense, 0)


def _copy_in(iov: Sequence[memoryview], data: bytes, limit: int) -> int:
    """Copy response bytes into the guest buffer; returns bytes copied."""
    data = data[:limit]
    pos = 0
    for view in iov:
        if pos >= len(data):
            break
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
    return pos


def _gather(iov: Sequence[memoryview], limit: int) -> bytes:
    return b"".join(bytes(v) for v in iov)[:limit]


def _io_error(exc: OSError, write: bool) -> ScsiResult:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ScsiResult.check(S.SPACE_ALLOCATION_FAILED)
    if exc.errno in (errno.EROFS, errno.EPERM, errno.EACCES, errno.EBADF):
        return ScsiResult.check(S.WRITE_PROTECTED)
    return ScsiResult.check(S.WRITE_ERROR if write else S.UNRECOVERED_READ_ERROR)


def _rw(disk: DiskImage, cdb: bytes, write: bool, iov: Sequence[memoryview], transfer: int) -> ScsiResult:
    op = cdb[0]
    fua = False
    if op in (S.Opcode.READ_6, S.Opcode.WRITE_6):
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        blocks = cdb[4] or 256
    elif op in (S.Opcode.READ_10, S.Opcode.WRITE_10):
        lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        fua = bool(cdb[1] & 0x08)
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
        fua = bool(cdb[1] & 0x08)
    if lba > disk.blocks or blocks > disk.blocks - lba:
        return ScsiResult.check(S.LBA_OUT_OF_RANGE)
    nbytes = blocks * disk.block_size
    if nbytes != transfer or sum(len(v) for v in iov) < nbytes:
        return ScsiResult.check(S.INVALID_FIELD_IN_CDB)
    if nbytes == 0:
        return ScsiResult.good()
    if write and disk.read_only:
        return ScsiResult.check(S.WRITE_PROTECTED)
    try:
        if write:
            done = disk.writev(iov, lba * disk.block_size, fua=fua)
        else:
            done = disk.readv(iov, lba * disk.block_size)
    except OSError as exc:
        return _io_error(exc, write)
    return ScsiResult.good(done)


def _unmap(disk: DiskImage, cdb: bytes, iov: Sequence[memoryview], transfer: int) -> ScsiResult:
    if disk.read_only:
        return ScsiResult.check(S.WRITE_PROTECTED)
    (param_len,) = struct.unpack_from(">H", cdb, 7)
    data = _gather(iov, min(param_len, transfer))
    if len(data) < 8:
        return ScsiResult.good() if param_len == 0 else ScsiResult.check(S.INVALID_FIELD_IN_PARAMETERS)
    _, desc_len = struct.unpack_from(">HH", data, 0)
    if desc_len % 16 or desc_len > len(data) - 8 or desc_len // 16 > MAX_UNMAP_DESCRIPTORS:
        return ScsiResult.check(S.INVALID_FIELD_IN_PARAMETERS)
    ranges = [struct.unpack_from(">QI", data, 8 + 16 * i) for i in range(desc_len // 16)]
    for lba, blocks in ranges:
        if lba > disk.blocks or blocks > disk.blocks - lba:
            return ScsiResult.check(S.LBA_OUT_OF_RANGE)
    try:
        for lba, blocks in ranges:
            if blocks:
                disk.discard(lba * disk.block_size, blocks * disk.block_size)
    except OSError as exc:
        return _io_error(exc, True)
    return ScsiResult.good()


def _inquiry(disk: DiskImage, cdb: bytes) -> bytes | None:
    evpd, page = cdb[1] & 1, cdb[2]
    if not evpd:
        if page:
            return None
        return bytes([0x00, 0x00, 0x06, 0x02, 31, 0, 0, 0x02]) + b"PVBUS   " + b"Virtual Disk    " + b"0001"
    if page == 0x00:
        pages = bytes([0x00, 0x80, 0xB0, 0xB2])
        return bytes([0, 0x00, 0, len(pages)]) + pages
    if page == 0x80:
        serial = b"PVBUS-%08X" % (hash(disk.path) & 0xFFFFFFFF)
        return bytes([0, 0x80, 0, len(serial)]) + serial
    if page == 0xB0:  # block limits: max transfer, unmap limits
        body = struct.pack(">BBHIIIIIII", 0, 0, 0, 0, 0, 0, 0xFFFFFFFF, MAX_UNMAP_DESCRIPTORS, 1, 0)
        return bytes([0, 0xB0]) + struct.pack(">H", 0x3C) + body.ljust(0x3C, b"\0")
    if page == 0xB2:  # logical block provisioning: UNMAP supported (LBPU)
        return bytes([0, 0xB2, 0, 4, 0, 0x80, 0, 0])
    return None


def _mode_sense(disk: DiskImage, cdb: bytes) -> bytes | None:
    page = cdb[2] & 0x3F
    if page not in (0x08, 0x3F):
        return None
    caching = bytes([0x08, 0x12, 0x04]) + bytes(17)  # WCE set: the host page cache is a write cache
    wp = 0x80 if disk.read_only else 0
    if cdb[0] == S.Opcode.MODE_SENSE_6:
        return bytes([3 + len(caching), 0, wp, 0]) + caching
    return struct.pack(">HBBHH", 6 + len(caching), 0, wp, 0, 0) + caching


def execute(disk: DiskImage, cdb: bytes, data_in: bool, iov: Sequence[memoryview], transfer: int) -> ScsiResult:
    """Run one command; ``iov`` covers exactly the guest's data buffer."""
    if not cdb:
        return ScsiResult.check(S.INVALID_OPCODE)
    op = cdb[0]
    if op in (S.Opcode.READ_6, S.Opcode.READ_10, S.Opcode.READ_16, S.Opcode.WRITE_6, S.Opcode.WRITE_10,
              S.Opcode.WRITE_16):
        write = op in (S.Opcode.WRITE_6, S.Opcode.WRITE_10, S.Opcode.WRITE_16)
        if write == data_in:
            return ScsiResult.check(S.INVALID_FIELD_IN_CDB)  # direction disagrees with the command
        return _rw(disk, cdb, write, iov, transfer)
    if op in (S.Opcode.SYNCHRONIZE_CACHE_10, S.Opcode.SYNCHRONIZE_CACHE_16):
        try:
            disk.flush()
        except OSError as exc:
            return _io_error(exc, True)
        return ScsiResult.good()
    if op == S.Opcode.UNMAP:
        return _unmap(disk, cdb, iov, transfer)
    if op == S.Opcode.TEST_UNIT_READY:
        return ScsiResult.good()
    response: bytes | None
    if op == S.Opcode.INQUIRY:
        response = _inquiry(disk, cdb)
        limit = struct.unpack_from(">H", cdb, 3)[0]
    elif op == S.Opcode.READ_CAPACITY_10:
        response = struct.pack(">II", min(disk.blocks - 1, 0xFFFFFFFF), disk.block_size)
        limit = 8
    elif op == S.Opcode.SERVICE_ACTION_IN_16 and (cdb[1] & 0x1F) == S.READ_CAPACITY_16_ACTION:
        response = struct.pack(">QIBB", disk.blocks - 1, disk.block_size, 0, 0x80) + bytes(18)  # LBPME
        limit = struct.unpack_from(">I", cdb, 10)[0]
    elif op in (S.Opcode.MODE_SENSE_6, S.Opcode.MODE_SENSE_10):
        response = _mode_sense(disk, cdb)
        limit = cdb[4] if op == S.Opcode.MODE_SENSE_6 else struct.unpack_from(">H", cdb, 7)[0]
    elif op == S.Opcode.REPORT_LUNS:
        response = struct.pack(">II", 8, 0) + bytes(8)
        limit = struct.unpack_from(">I", cdb, 6)[0]
    else:
        return ScsiResult.check(S.INVALID_OPCODE)
    if response is None:
        return ScsiResult.check(S.INVALID_FIELD_IN_CDB)
    return ScsiResult.good(_copy_in(iov, response, min(limit, transfer)))
