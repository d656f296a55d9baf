"""An unmodified guest's IDE driver: programmed I/O through the task file.

Every register access, and every 16-bit data word, is a trapped exit to the
host's device model (``host_drivers.emulated.ide``).  It is here to be slow
in the honest way hardware emulation is.
"""

from __future__ import annotations

import struct

from guest_kernel.hypercalls import Hypercalls
from vmbus.protocols.emulated_disks import IDE_BASE

BASE = IDE_BASE
DATA, FEATURES, COUNT, LBA0, LBA1, LBA2, DEVICE, COMMAND = range(8)
DRQ, ERR = 0x08, 0x01
READ_SECTORS, WRITE_SECTORS, FLUSH_CACHE, IDENTIFY = 0x20, 0x30, 0xE7, 0xEC
SECTOR = 512


class IdeError(IOError):
    pass


class IdeDisk:
    def __init__(self, hypercalls: Hypercalls) -> None:
        self.hc = hypercalls
        self.capacity = 0
        self.bytes_moved = 0  # data actually transferred, sector by sector

    async def _out(self, port: int, value: int) -> None:
        await self.hc.io(BASE + port, 1, write=True, value=value)

    async def _status(self) -> int:
        return await self.hc.io(BASE + COMMAND, 1)

    async def probe(self) -> bool:
        if await self._status() == 0xFF:  # nothing decodes the port: no controller
            return False
        await self._out(COMMAND, IDENTIFY)
        words = await self._read_sector()
        lba_blocks = words[60] | (words[61] << 16)
        self.capacity = lba_blocks * SECTOR
        return True

    async def _wait_drq(self) -> None:
        while True:
            status = await self._status()
            if status & ERR:
                error = await self.hc.io(BASE + FEATURES, 1)
                raise IdeError(f"IDE command failed (error {error:#x})")
            if status & DRQ:
                return

    async def _read_sector(self) -> list[int]:
        await self._wait_drq()
        return [await self.hc.io(BASE + DATA, 2) for _ in range(SECTOR // 2)]

    async def _setup(self, lba: int, count: int, command: int) -> None:
        if lba < 0 or lba + count > 1 << 28:
            raise ValueError("LBA28 range exceeded")
        await self._out(COUNT, count & 0xFF)
        await self._out(LBA0, lba & 0xFF)
        await self._out(LBA1, (lba >> 8) & 0xFF)
        await self._out(LBA2, (lba >> 16) & 0xFF)
        await self._out(DEVICE, 0x40 | ((lba >> 24) & 0x0F))
        await self._out(COMMAND, command)

    async def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        lba, sectors = offset // SECTOR, length // SECTOR
        while sectors:
            n = min(sectors, 256)
            await self._setup(lba, n, READ_SECTORS)
            for _ in range(n):
                out += struct.pack(f"<{SECTOR // 2}H", *await self._read_sector())
                self.bytes_moved += SECTOR
            lba, sectors = lba + n, sectors - n
        return bytes(out)

    async def write(self, offset: int, data: bytes) -> None:
        lba, sectors = offset // SECTOR, len(data) // SECTOR
        pos = 0
        while sectors:
            n = min(sectors, 256)
            await self._setup(lba, n, WRITE_SECTORS)
            for _ in range(n):
                await self._wait_drq()
                for word in struct.unpack_from(f"<{SECTOR // 2}H", data, pos):
                    await self.hc.io(BASE + DATA, 2, write=True, value=word)
                pos += SECTOR
                self.bytes_moved += SECTOR
            lba, sectors = lba + n, sectors - n
        if await self._status() & ERR:
            raise IdeError("IDE write failed")

    async def flush(self) -> None:
        await self._out(COMMAND, FLUSH_CACHE)
