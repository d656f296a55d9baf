"""An unmodified guest's driver for the emulated DMA disk controller.

Per request: four register writes (command, LBA, count, buffer address),
the doorbell, wait for the interrupt, read the status, acknowledge the
interrupt: seven trapped exits and one interrupt, one request at a time,
as a fully virtualized guest without paravirtual drivers pays.
"""

from __future__ import annotations

from typing import Any

from vmbus.protocols.emulated_disks import DMA_BASE

from ..memory import PAGE_SHIFT, DmaBuffer

BASE = DMA_BASE
CMD, LBA, COUNT, ADDR, DOORBELL, STATUS, INT_ACK, CAPACITY = range(0, 0x40, 8)
READ, WRITE, FLUSH = 1, 2, 3
DONE, ERROR = 0x1, 0x2
BLOCK = 512


class DmaDiskError(IOError):
    pass


class DmaDiskDriver:
    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.hc = kernel.hypercalls
        self.capacity = 0

    async def _reg(self, offset: int, value: int | None = None) -> int:
        if value is None:
            return int(await self.hc.io(BASE + offset, 8))
        return int(await self.hc.io(BASE + offset, 8, write=True, value=value))

    async def probe(self) -> bool:
        blocks = await self._reg(CAPACITY)
        if blocks == (1 << 64) - 1:
            return False
        self.capacity = blocks * BLOCK
        return True

    async def _command(self, cmd: int, lba: int = 0, count: int = 0, gpa: int = 0) -> None:
        await self._reg(CMD, cmd)
        await self._reg(LBA, lba)
        await self._reg(COUNT, count)
        await self._reg(ADDR, gpa)
        seen = self.kernel.legacy_irqs
        await self._reg(DOORBELL, 1)
        await self.kernel.wait_legacy_irq(seen)
        status = await self._reg(STATUS)
        await self._reg(INT_ACK, 1)
        if status & ERROR or not status & DONE:
            raise DmaDiskError(f"DMA disk command {cmd} failed (status {status:#x})")

    async def transfer(self, write: bool, offset: int, buffer: DmaBuffer, length: int | None = None) -> None:
        """Move ``length`` bytes between the disk at ``offset`` and ``buffer`` (guest RAM)."""
        length = len(buffer.view) if length is None else length
        await self._command(WRITE if write else READ, offset // BLOCK, length // BLOCK, buffer.pfn << PAGE_SHIFT)

    async def read(self, offset: int, length: int) -> bytes:
        with DmaBuffer(self.kernel.ram, length) as buf:
            await self.transfer(False, offset, buf, length)
            return bytes(buf.view)

    async def write(self, offset: int, data: bytes) -> None:
        with DmaBuffer(self.kernel.ram, len(data)) as buf:
            buf.view[:] = data
            await self.transfer(True, offset, buf)

    async def flush(self) -> None:
        await self._command(FLUSH)
