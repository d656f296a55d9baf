"""A DMA disk controller that an unmodified driver programs register by register.

Registers (8 bytes each, offset from 0x1000): 0x00 command (1 read, 2 write,
3 flush), 0x08 LBA, 0x10 count (512-byte blocks, at most 2048), 0x18 buffer
GPA (physically contiguous), 0x20 doorbell (write: run the command), 0x28
status (bit 0 done, bit 1 error), 0x30 interrupt acknowledge (write),
0x38 capacity in blocks (read).  Every register takes aligned 8-byte
accesses only; any other size or alignment reads as a floating bus (all
ones) and a write of it is ignored, so no access can raise.  A request
costs seven trapped accesses and one interrupt, one request at a time, no
interrupt suppression; the data moves by DMA between the image and guest
RAM (checked against guest RAM's bounds), with no copy on the host.
"""

from __future__ import annotations

from typing import Any

import trio

from host_drivers.storage.backend import DiskImage
from vmbus import hv
from vmbus.guest_memory import GuestMemoryError

CMD, LBA, COUNT, ADDR, DOORBELL, STATUS, INT_ACK, CAPACITY = range(0, 0x40, 8)
READ, WRITE, FLUSH = 1, 2, 3
DONE, ERROR = 0x1, 0x2
MAX_BLOCKS = 2048
BLOCK = 512


class DmaDisk:
    def __init__(self, disk: DiskImage, partition: Any) -> None:
        self.disk = disk
        self.partition = partition
        self.regs = {CMD: 0, LBA: 0, COUNT: 0, ADDR: 0}
        self.status = 0
        self.requests = 0

    def close(self) -> None:
        self.disk.close()

    async def _run(self) -> int:
        cmd, lba, count, addr = (self.regs[k] for k in (CMD, LBA, COUNT, ADDR))
        if cmd == FLUSH:
            await trio.to_thread.run_sync(self.disk.flush)
            return DONE
        if cmd not in (READ, WRITE) or not 0 < count <= MAX_BLOCKS or lba + count > self.disk.blocks:
            return DONE | ERROR
        if cmd == WRITE and self.disk.read_only:
            return DONE | ERROR
        try:
            view = self.partition.memory.view(addr, count * BLOCK)
        except GuestMemoryError:
            return DONE | ERROR
        op = self.disk.writev if cmd == WRITE else self.disk.readv
        try:
            await trio.to_thread.run_sync(op, [view], lba * BLOCK)
        except OSError:
            return DONE | ERROR
        return DONE

    async def access(self, offset: int, size: int, write: bool, value: int) -> int:
        if size != 8 or offset % 8:
            return 0 if write else (1 << (8 * size)) - 1
        if write:
            if offset in self.regs:
                self.regs[offset] = value
            elif offset == DOORBELL:
                self.status = await self._run()
                self.requests += 1
                self.partition.interrupt(hv.LEGACY_IRQ_FLAG)  # no suppression: one per request
            elif offset == INT_ACK:
                self.status = 0
            return value
        if offset == STATUS:
            return self.status
        if offset == CAPACITY:
            return self.disk.blocks
        return self.regs.get(offset, 0)
