"""Hardware emulation: the same guest code under a CPU emulator (unicorn).

The x86-64 guest code of ``guestbin`` runs in unicorn (QEMU's CPU
emulation as a library: every guest instruction is decoded and translated
by software, no hardware virtualization) over the same guest RAM (the
memfd, mapped in with ``mem_map_ptr``) and the same device model: the
one-page hole at ``DMA_GPA`` is an MMIO region whose read and write hooks
call ``DmaDisk.access`` (the emulator splits 8-byte accesses in 4-byte
halves; the glue joins them again).  The emulator runs in a worker thread; each hook
hands the access to the trio loop (``trio.from_thread.run``).  Completion
is by polling the status register: the emulator delivers no external
interrupts here, and the guest keeps its interrupts masked.

The compute workload also runs built for aarch64 (``checksum-aarch64.bin``)
under unicorn's ARM64 CPU: a guest for hardware this host does not have,
which KVM cannot run.

``available()`` says whether unicorn can be used (``PVBUS_NO_EMULATOR=1``
makes it say no, to take the fallback on purpose).
"""

from __future__ import annotations

import os
import time
from typing import Any

from host_drivers.emulated import DMA_REGS

from . import guestbin
from .guestbin import BUFFER_GPA, CODE_GPA, DMA_GPA, MMIO_HOLE, POWER_OFF_GPA, STACK_TOP, GuestMachine

MECHANISM = ("unicorn CPU emulator (software translation), DMA controller by MMIO hooks (exits: hook calls, two "
             "per 8-byte register access), completion by polling")


class EmulatorUnavailable(RuntimeError):
    """No usable CPU emulator."""


def available() -> tuple[bool, str]:
    if os.environ.get("PVBUS_NO_EMULATOR"):
        return False, "the CPU emulator turned off (PVBUS_NO_EMULATOR)"
    try:
        import unicorn  # noqa: F401
    except ImportError:
        return False, "the unicorn package is not installed (the bench extra)"
    return True, ""


class X86Emulator:
    """An emulated x86-64 CPU over a ``GuestMachine``'s RAM."""

    def __init__(self, machine: GuestMachine) -> None:
        ok, why = available()
        if not ok:
            raise EmulatorUnavailable(why)
        from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
        from unicorn.x86_const import UC_X86_REG_RSP

        self.machine = machine
        self.accesses = 0  # the device model's accesses (8-byte registers)
        self.hooks = 0  # the emulator's MMIO hook calls (two per 8-byte access)
        self._read_high: tuple[int, int] = (-1, 0)
        self._write_low: tuple[int, int] = (-1, 0)
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        base, (hole, hole_size) = machine.memory.c_address, MMIO_HOLE
        self.uc.mem_map_ptr(0, hole, UC_PROT_ALL, base)
        self.uc.mem_map_ptr(hole + hole_size, machine.ram - hole - hole_size, UC_PROT_ALL, base + hole + hole_size)
        self.uc.mmio_map(hole, hole_size, self._read, None, self._write, None)
        self.uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
        self._model: Any = None
        self._on_access: Any = None
        self._error: BaseException | None = None

    # unicorn hands an 8-byte MMIO access to its hooks as two 4-byte halves,
    # low then high (the order of the guest's one instruction).  The glue puts
    # them back together: the low half of a read asks the model for all 8
    # bytes, the high half returns the rest; a write's low half is held until
    # its high half arrives.  Any other access goes to the model as it is.

    def _access(self, offset: int, size: int, write: bool, value: int) -> int:
        import trio

        self.accesses += 1
        result = int(trio.from_thread.run(self._model.access, offset, size, write, value))
        if self._on_access is not None:
            self._on_access(offset, write)
        return result

    def _read(self, uc: Any, offset: int, size: int, _: Any) -> int:
        self.hooks += 1
        if self._model is None or offset >= DMA_REGS:
            return (1 << 8 * size) - 1  # nothing decodes it: a floating bus
        if size == 4 and offset % 8 == 0:
            full = self._access(offset, 8, False, 0)
            self._read_high = (offset, full >> 32)
            return full & 0xFFFFFFFF
        if size == 4 and offset % 8 == 4 and self._read_high[0] == offset - 4:
            return self._read_high[1]
        return self._access(offset, size, False, 0)

    def _write(self, uc: Any, offset: int, size: int, value: int, _: Any) -> None:
        self.hooks += 1
        if offset == POWER_OFF_GPA - DMA_GPA:
            uc.emu_stop()
            return
        if self._model is None or offset >= DMA_REGS:
            return
        if size == 4 and offset % 8 == 0:
            self._write_low = (offset, value)
            return
        if size == 4 and offset % 8 == 4 and self._write_low[0] == offset - 4:
            self._access(offset - 4, 8, True, value << 32 | self._write_low[1])
            return
        self._access(offset, size, True, value)

    def emulate(self) -> None:
        """Run the guest until it powers off (blocking)."""
        self.uc.emu_start(CODE_GPA, 0)

    async def run(self, model: Any = None, on_access: Any = None) -> None:
        import trio

        self._model, self._on_access = model, on_access
        await trio.to_thread.run_sync(self.emulate)


def run_compute(machine: GuestMachine, length: int) -> tuple[int, float]:
    """The x86-64 guest's checksum of ``length`` bytes at the buffer, emulated: (sum, seconds)."""
    machine.set_job(guestbin.Job(guestbin.OP_CHECKSUM, length=length))
    emu = X86Emulator(machine)
    t0 = time.perf_counter()
    emu.emulate()
    return machine.results()["checksum"], time.perf_counter() - t0


def run_compute_aarch64(machine: GuestMachine, length: int) -> tuple[int, float]:
    """The checksum routine built for aarch64, on an emulated ARM64 CPU over
    the same RAM: (sum, seconds).  Raises ``GuestCodeUnavailable`` without
    the cross-built routine."""
    ok, why = available()
    if not ok:
        raise EmulatorUnavailable(why)
    from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, UC_PROT_ALL, Uc
    from unicorn.arm64_const import UC_ARM64_REG_LR, UC_ARM64_REG_SP, UC_ARM64_REG_X0, UC_ARM64_REG_X1

    code = guestbin.binary(guestbin.ARM_BINARY)
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    uc.mem_map_ptr(0, machine.ram, UC_PROT_ALL, machine.memory.c_address)
    saved = bytes(machine.memory.view(CODE_GPA, len(code)))
    machine.load(CODE_GPA, code)
    try:
        returns_to = 0x1000  # the call returns here: where the emulation stops
        uc.reg_write(UC_ARM64_REG_X0, BUFFER_GPA)
        uc.reg_write(UC_ARM64_REG_X1, length // 8)
        uc.reg_write(UC_ARM64_REG_SP, STACK_TOP)
        uc.reg_write(UC_ARM64_REG_LR, returns_to)
        t0 = time.perf_counter()
        uc.emu_start(CODE_GPA, returns_to)
        return int(uc.reg_read(UC_ARM64_REG_X0)), time.perf_counter() - t0
    finally:
        machine.load(CODE_GPA, saved)


def run_block(image: str, wl: Any) -> dict[str, Any]:
    """One ``blockload`` workload by the guest driver under the emulator."""
    import trio

    machine = GuestMachine()
    emu = X86Emulator(machine)
    try:
        # its exits are the hook calls: each a trip from emulated code to the host's model
        rec = trio.run(guestbin.measure, machine, image, wl, "emulated", emu.run, lambda: emu.hooks, False)
    finally:
        machine.close()
    rec["mechanism"] = MECHANISM
    return rec
