"""An IDE-like controller, programmed I/O only (ATA task file, LBA28).

Ports (offset from 0x1F0): 0 data (16-bit), 1 error/features, 2 sector
count, 3-5 LBA bits 0-23, 6 device (LBA bits 24-27, 0x40 = LBA mode),
7 status/command.  The data port takes 16-bit accesses only, the other
ports 8-bit only; any other size is refused (``RegisterAccessRefused``: the
exit fails with INVALID_PARAMETER, the controller's state is untouched).
Commands: READ SECTORS (0x20), WRITE SECTORS (0x30),
FLUSH CACHE (0xE7), IDENTIFY DEVICE (0xEC).  Status bits: BSY 0x80, DRDY
0x40, DRQ 0x08, ERR 0x01; error bits: ABRT 0x04, IDNF 0x10.  A sector
moves as 256 word accesses of the data port: 256 exits per 512 bytes,
which is the point.
"""

from __future__ import annotations

import struct

import trio

from host_drivers.storage.backend import DiskImage
from vmbus.errors import RegisterAccessRefused

DATA = 0
ACCESS_SIZE = {DATA: 2, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}  # port -> the one size it takes
DRDY, DRQ, ERR = 0x40, 0x08, 0x01
ABRT, IDNF = 0x04, 0x10
READ_SECTORS, WRITE_SECTORS, FLUSH_CACHE, IDENTIFY = 0x20, 0x30, 0xE7, 0xEC
SECTOR = 512


class IdePio:
    def __init__(self, disk: DiskImage) -> None:
        self.disk = disk
        self.regs = bytearray(8)
        self.status = DRDY
        self.error = 0
        self.buffer = bytearray(SECTOR)
        self.pos = SECTOR
        self.remaining = 0
        self.lba = 0
        self.writing = False

    def close(self) -> None:
        self.disk.close()

    def _lba28(self) -> int:
        r = self.regs
        return ((r[6] & 0x0F) << 24) | (r[5] << 16) | (r[4] << 8) | r[3]

    def _fail(self, error: int) -> None:
        self.status, self.error, self.remaining = DRDY | ERR, error, 0

    async def _load(self) -> None:
        await trio.to_thread.run_sync(self.disk.readv, [memoryview(self.buffer)], self.lba * SECTOR)
        self.pos = 0
        self.status = DRDY | DRQ

    async def _command(self, cmd: int) -> None:
        self.error = 0
        count = self.regs[2] or 256
        self.lba = self._lba28()
        if cmd == IDENTIFY:
            words = [0] * 256
            blocks = min(self.disk.blocks, 0x0FFFFFFF)
            words[49] = 1 << 9  # LBA supported
            words[60], words[61] = blocks & 0xFFFF, blocks >> 16
            self.buffer[:] = struct.pack("<256H", *words)
            self.pos, self.remaining, self.writing, self.status = 0, 1, False, DRDY | DRQ
            return
        if cmd == FLUSH_CACHE:
            await trio.to_thread.run_sync(self.disk.flush)
            self.status = DRDY
            return
        if cmd not in (READ_SECTORS, WRITE_SECTORS) or not self.regs[6] & 0x40:
            self._fail(ABRT)
            return
        if self.lba + count > self.disk.blocks:
            self._fail(IDNF)
            return
        if cmd == WRITE_SECTORS and self.disk.read_only:
            self._fail(ABRT)
            return
        self.remaining, self.writing = count, cmd == WRITE_SECTORS
        if self.writing:
            self.pos, self.status = 0, DRDY | DRQ
        else:
            await self._load()

    async def _data(self, write: bool, value: int) -> int:
        if not self.status & DRQ:
            return 0xFFFF if not write else 0
        if write != self.writing:
            return 0
        if write:
            struct.pack_into("<H", self.buffer, self.pos, value)
            out = value
        else:
            (out,) = struct.unpack_from("<H", self.buffer, self.pos)
        self.pos += 2
        if self.pos == SECTOR:
            if write:
                await trio.to_thread.run_sync(self.disk.writev, [memoryview(self.buffer)], self.lba * SECTOR)
            self.remaining -= 1
            self.lba += 1
            if self.remaining == 0:
                self.status = DRDY
            elif write:
                self.pos = 0
            else:
                await self._load()
        return out

    async def access(self, offset: int, size: int, write: bool, value: int) -> int:
        takes = ACCESS_SIZE.get(offset)
        if size != takes:
            raise RegisterAccessRefused(f"{size}-byte access to IDE port {offset} "
                                        + (f"(it takes {takes}-byte accesses)" if takes else "(no such port)"))
        if offset == DATA:
            return await self._data(write, value)
        if write:
            if offset == 7:
                await self._command(value & 0xFF)
            elif offset < 7:
                self.regs[offset] = value & 0xFF
            return value
        if offset == 7:
            return self.status
        if offset == 1:
            return self.error
        return self.regs[offset]
