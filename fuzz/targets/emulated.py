"""Emulated register accesses: the IDE (PIO) and DMA disk controllers.

An input is a sequence of trapped I/O exits, sent through
``Partition.handle_exit`` to the controllers attached as the host attaches
them (both on one image): a port or register (mostly one that decodes,
sometimes any address), an access size (mostly the right one), read or
write, and a value (often a command, a small block number or a buffer
address inside guest RAM).

Invariants: every exit is answered with an HV_STATUS in the I/O reply
format, never an exception (a refused access is an error status, not a
traceback); a value read fits the access size; the host writes guest RAM
only inside the buffers of DMA reads the guest started and the event
flags of its SIEFP page; the image changes only inside the sectors of an
IDE WRITE SECTORS or a DMA write the guest started.
"""

from __future__ import annotations

from fuzz.rig import Input, Machine, ScratchDisk, Script, changed_ranges, check, inside, no_fd_left_open, run
from fuzz.targets.hypercall import synic_areas
from host_drivers.emulated import DMA_BASE, DMA_REGS, IDE_BASE, IDE_PORTS, dma, ide
from host_drivers.storage.backend import DiskImage
from vmbus.guest_memory import PAGE_SIZE
from vmbus.transport import IO_BODY, IO_REPLY, KIND, ExitKind

RAM_PAGES = 32
DISK = ScratchDisk(64 << 10)
SECTOR = 512
IDE_COMMANDS = (ide.READ_SECTORS, ide.WRITE_SECTORS, ide.FLUSH_CACHE, ide.IDENTIFY)
DMA_COMMANDS = (dma.READ, dma.WRITE, dma.FLUSH)
MAX_EXITS = 2000  # an IDE sector is 256 data exits


def access(inp: Input) -> tuple[int, int, bool, int]:
    """(address, size, write, value) of one register access."""
    target, how = inp.u8(), inp.u8()
    write = bool(how & 1)
    if target < 0x70:  # IDE
        port = target % IDE_PORTS
        size = (2 if port == 0 else 1) if how < 0xE0 else (1, 2, 4, 8)[how & 3]
        if port == 7 and write and how & 2:
            value = IDE_COMMANDS[inp.u8() % len(IDE_COMMANDS)]
        elif port == 0:
            value = inp.u16()
        else:
            value = inp.u8()
        return IDE_BASE + port, size, write, value
    if target < 0xE0:  # DMA
        reg = (target % (DMA_REGS // 8)) * 8
        size = 8 if how < 0xE0 else (1, 2, 4, 8)[how & 3]
        if how & 2:
            value = {dma.CMD: DMA_COMMANDS[inp.u8() % 3], dma.LBA: inp.u8(), dma.COUNT: inp.u8() % 20,
                     dma.ADDR: inp.u16() % (RAM_PAGES * PAGE_SIZE)}.get(reg, inp.u8())
        else:
            value = inp.u64()
        return DMA_BASE + reg + (0 if how < 0xF0 else how & 7), size, write, value
    return inp.u32(), inp.u8(), write, inp.u64()


class Shadow:
    """What the guest programmed, to know which RAM and sectors it opened up."""

    def __init__(self) -> None:
        self.ide = bytearray(8)
        self.dma = {dma.CMD: 0, dma.LBA: 0, dma.COUNT: 0, dma.ADDR: 0}
        self.ram: list[tuple[int, int]] = []
        self.disk: list[tuple[int, int]] = []

    def before(self, addr: int, size: int, write: bool, value: int) -> None:
        if not write:
            return
        value &= (1 << (8 * size)) - 1
        if IDE_BASE < addr < IDE_BASE + 7 and size == 1:
            self.ide[addr - IDE_BASE] = value
        elif addr == IDE_BASE + 7 and size == 1 and value == ide.WRITE_SECTORS:
            r = self.ide
            lba = ((r[6] & 0x0F) << 24) | (r[5] << 16) | (r[4] << 8) | r[3]
            self.disk.append((lba * SECTOR, (lba + (r[2] or 256)) * SECTOR))
        elif size == 8 and addr - DMA_BASE in self.dma:
            self.dma[addr - DMA_BASE] = value
        elif size == 8 and addr == DMA_BASE + dma.DOORBELL:
            cmd, lba, count, buf = (self.dma[k] for k in (dma.CMD, dma.LBA, dma.COUNT, dma.ADDR))
            if cmd == dma.READ:
                self.ram.append((buf, buf + count * SECTOR))
            elif cmd == dma.WRITE:
                self.disk.append((lba * SECTOR, (lba + count) * SECTOR))


async def drive(accesses: list[tuple[int, int, bool, int]]) -> None:
    machine = Machine(RAM_PAGES)
    disks = [DiskImage(str(DISK.path)) for _ in range(2)]
    shadow = Shadow()
    try:
        machine.partition.io_regions = [(IDE_BASE, IDE_PORTS, ide.IdePio(disks[0])),
                                        (DMA_BASE, DMA_REGS, dma.DmaDisk(disks[1], machine.partition))]
        await machine.enable_synic()
        ram_before, disk_before = bytes(machine.ram.buf), DISK.read()
        for addr, size, write, value in accesses:
            shadow.before(addr, size, write, value)
            reply, _ = await machine.exit(KIND.pack(ExitKind.IO) + IO_BODY.pack(addr, size, int(write), 0, value))
            _, read = IO_REPLY.unpack(reply)
            if size in (1, 2, 4, 8):
                check(read < 1 << (8 * size), f"{size}-byte read of {addr:#x} returned {read:#x}")
        changed = changed_ranges(ram_before, machine.ram.buf)
        check(inside(changed, shadow.ram + synic_areas(machine)), f"RAM written at {changed}, DMA reads {shadow.ram}")
        changed = changed_ranges(disk_before, DISK.read(), SECTOR)
        check(inside(changed, shadow.disk), f"image written at {changed}, writes started {shadow.disk}")
    finally:
        for disk in disks:
            disk.close()
        await machine.close()


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    accesses = []
    while inp.left and len(accesses) < MAX_EXITS:
        accesses.append(access(inp))
    DISK.reset()
    with no_fd_left_open():
        run(drive, accesses)


def _ide(s: Script, port: int, write: bool, value: int, command: bool = False) -> None:
    s.u8(port).u8(int(write) | (2 if command else 0))
    if command:
        s.u8(IDE_COMMANDS.index(value))
    elif port == 0:
        s.u16(value)
    else:
        s.u8(value)


def _dma(s: Script, reg: int, write: bool, value: int | None = None) -> None:
    s.u8(0x70 + reg // 8).u8(int(write) | (2 if value is not None and reg != dma.DOORBELL else 0))
    if value is not None and reg != dma.DOORBELL:
        s.u8(DMA_COMMANDS.index(value)) if reg == dma.CMD else (s.u16(value) if reg == dma.ADDR else s.u8(value))
    else:
        s.u64(0)


def seeds() -> list[bytes]:
    """IDENTIFY then a one-sector write and read-back over PIO; a DMA write,
    read and flush of 2 sectors; a read of every register."""
    s = Script()
    _ide(s, 6, True, 0x40)
    _ide(s, 7, True, ide.IDENTIFY, command=True)
    for _ in range(256):
        _ide(s, 0, False, 0)
    for port, value in ((2, 1), (3, 5), (4, 0), (5, 0), (6, 0x40)):
        _ide(s, port, True, value)
    _ide(s, 7, True, ide.WRITE_SECTORS, command=True)
    for i in range(256):
        _ide(s, 0, True, i * 257)
    _ide(s, 7, False, 0)
    _ide(s, 7, True, ide.READ_SECTORS, command=True)
    for _ in range(256):
        _ide(s, 0, False, 0)
    d = Script()
    for cmd in (dma.WRITE, dma.READ, dma.FLUSH):
        _dma(d, dma.CMD, True, cmd)
        _dma(d, dma.LBA, True, 3)
        _dma(d, dma.COUNT, True, 2)
        _dma(d, dma.ADDR, True, 4 * PAGE_SIZE)
        _dma(d, dma.DOORBELL, True)
        _dma(d, dma.STATUS, False)
        _dma(d, dma.INT_ACK, True)
    regs = Script()
    for port in range(IDE_PORTS):
        _ide(regs, port, False, 0)
    for reg in range(0, DMA_REGS, 8):
        _dma(regs, reg, False)
    return [s.data(), d.data(), regs.data()]
