"""Full virtualization on hardware virtualization: the guest code in a KVM vCPU.

The x86-64 guest code (``guestbin``) runs unmodified in a KVM virtual
machine made with the kernel's ioctls from Python (``fcntl.ioctl`` over
ctypes structures, ``linux/kvm.h``): ``KVM_CREATE_VM``, guest RAM (the
memfd of a ``GuestMachine``) as two memory slots around a one-page hole at
``DMA_GPA``, one vCPU started in 64-bit long mode as firmware would leave
it (identity-mapped 2 MiB pages, flat segments; the guest loads its own
GDT and IDT).

The DMA controller's registers are MMIO: the guest's 8-byte loads and
stores in the hole exit with ``KVM_EXIT_MMIO`` and go, unchanged, to
``DmaDisk.access`` (the device model of the trapped path).  Completion is
an injected interrupt: the model raises its line during the doorbell's
exit, and the next entry injects vector ``IRQ_VECTOR`` with
``KVM_INTERRUPT`` once the vCPU can take it (``request_interrupt_window``
until then; the guest sleeps in ``sti; hlt``).  Every exit is counted by
its KVM exit reason.

``available()`` says whether /dev/kvm can be used (``PVBUS_NO_KVM=1``
makes it say no, to take the fallback on purpose).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import time
from collections import Counter
from typing import Any

from host_drivers.emulated import DMA_REGS

from . import guestbin
from .guestbin import DMA_GPA, IRQ_VECTOR, GuestMachine

# ioctl numbers (linux/kvm.h: _IO/_IOR/_IOW with type 0xAE)
KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_GET_VCPU_MMAP_SIZE = 0xAE00, 0xAE01, 0xAE04
KVM_CREATE_VCPU, KVM_SET_TSS_ADDR, KVM_RUN = 0xAE41, 0xAE47, 0xAE80
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_GET_REGS, KVM_SET_REGS = 0x8090AE81, 0x4090AE82
KVM_GET_SREGS, KVM_SET_SREGS = 0x8138AE83, 0x4138AE84
KVM_INTERRUPT = 0x4004AE86

EXIT_REASONS = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
                7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR"}
EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_IRQ_WINDOW_OPEN, EXIT_INTR = 2, 5, 6, 7, 10

# Page tables (firmware's job): PML4, PDPT and one page directory of 2 MiB
# pages mapping the first GiB 1:1, in RAM the guest code does not use.
PML4_GPA, PDPT_GPA, PD_GPA = 0x2000, 0x3000, 0x4000
TSS_ADDR = 0xFFFBD000  # three pages above RAM that Intel's VMX wants for itself


class KvmUnavailable(RuntimeError):
    """No usable /dev/kvm (missing, no permission, or turned off)."""


class KvmError(RuntimeError):
    """The vCPU stopped in a way a finished guest does not."""


class Segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
                ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
                ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8), ("padding", ctypes.c_uint8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment), ("gs", Segment),
                ("ss", Segment), ("tr", Segment), ("ldt", Segment), ("gdt", DTable), ("idt", DTable),
                ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
                ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
                ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class Regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                 "r14", "r15", "rip", "rflags")]


class MemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64)]


class RunHeader(ctypes.Structure):
    """The start of ``struct kvm_run`` (the vCPU's shared page)."""
    _fields_ = [("request_interrupt_window", ctypes.c_uint8), ("immediate_exit", ctypes.c_uint8),
                ("padding1", ctypes.c_uint8 * 6), ("exit_reason", ctypes.c_uint32),
                ("ready_for_interrupt_injection", ctypes.c_uint8), ("if_flag", ctypes.c_uint8),
                ("flags", ctypes.c_uint16), ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64)]


class MmioExit(ctypes.Structure):
    _fields_ = [("phys_addr", ctypes.c_uint64), ("data", ctypes.c_uint8 * 8), ("len", ctypes.c_uint32),
                ("is_write", ctypes.c_uint8)]


class IoExit(ctypes.Structure):
    _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8), ("port", ctypes.c_uint16),
                ("count", ctypes.c_uint32), ("data_offset", ctypes.c_uint64)]


EXIT_UNION = ctypes.sizeof(RunHeader)  # 32: where the exit's details start


def _ioctl_ulong(fd: int, request: int, arg: int) -> None:
    """An ioctl whose argument is an unsigned long (``fcntl.ioctl`` takes a C int)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def available() -> tuple[bool, str]:
    """(usable, why not)."""
    if os.environ.get("PVBUS_NO_KVM"):
        return False, "KVM turned off (PVBUS_NO_KVM)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return False, "/dev/kvm speaks an unknown API version"
    finally:
        os.close(fd)
    return True, ""


class Vcpu:
    """One VM with one vCPU over a ``GuestMachine``'s RAM."""

    def __init__(self, machine: GuestMachine) -> None:
        ok, why = available()
        if not ok:
            raise KvmUnavailable(why)
        self.machine = machine
        self.exits: Counter[str] = Counter()
        self.injected = 0
        self._fds: list[int] = []
        self.kvm = self._own(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        self.vm = self._own(fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0))
        _ioctl_ulong(self.vm, KVM_SET_TSS_ADDR, TSS_ADDR)
        base = machine.memory.c_address
        hole, hole_size = guestbin.MMIO_HOLE
        for slot, (gpa, size) in enumerate([(0, hole), (hole + hole_size, machine.ram - hole - hole_size)]):
            fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, MemoryRegion(slot, 0, gpa, size, base + gpa))
        self.fd = self._own(fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0))
        size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = RunHeader.from_buffer(self._map)
        self.mmio = MmioExit.from_buffer(self._map, EXIT_UNION)
        self.io = IoExit.from_buffer(self._map, EXIT_UNION)
        self._firmware()

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _firmware(self) -> None:
        """Long mode, as a boot loader leaves it: paging over an identity map."""
        mem = self.machine.memory
        # present, writable, user (the guest's driver runs in its ring 3)
        struct.pack_into("<Q", mem.view(PML4_GPA, 8), 0, PDPT_GPA | 0x7)
        struct.pack_into("<Q", mem.view(PDPT_GPA, 8), 0, PD_GPA | 0x7)
        struct.pack_into("<512Q", mem.view(PD_GPA, 4096), 0, *((i << 21) | 0x87 for i in range(512)))  # 2 MiB pages
        sregs = Sregs()
        fcntl.ioctl(self.fd, KVM_GET_SREGS, sregs)
        code = Segment(0, 0xFFFFFFFF, 0x08, 11, 1, 0, 0, 1, 1, 1)  # execute/read, accessed; long mode
        data = Segment(0, 0xFFFFFFFF, 0x10, 3, 1, 0, 1, 1, 0, 1)
        sregs.cs = code
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
        sregs.cr3 = PML4_GPA
        sregs.cr4 = 1 << 5  # PAE
        sregs.cr0 = 0x80050033  # PG, WP, NE, ET, MP, PE
        sregs.efer = 0x500  # LME, LMA
        fcntl.ioctl(self.fd, KVM_SET_SREGS, sregs)
        regs = Regs()
        regs.rip, regs.rsp, regs.rflags = guestbin.CODE_GPA, guestbin.STACK_TOP, 0x2
        fcntl.ioctl(self.fd, KVM_SET_REGS, regs)

    def _enter(self) -> int:
        """Inject a pending interrupt if the vCPU can take it (else ask to
        exit when it can), then run until the next exit; its reason."""
        run = self.run_page
        if self.machine.raised > self.injected:
            if run.ready_for_interrupt_injection:
                fcntl.ioctl(self.fd, KVM_INTERRUPT, struct.pack("<I", IRQ_VECTOR))
                self.injected += 1
                run.request_interrupt_window = 0
            else:
                run.request_interrupt_window = 1
        while True:
            try:
                fcntl.ioctl(self.fd, KVM_RUN, 0)
                break
            except InterruptedError:  # a signal for this process: enter again
                continue
        reason = run.exit_reason
        self.exits[EXIT_REASONS.get(reason, str(reason))] += 1
        return int(reason)

    async def run(self, model: Any = None, on_access: Any = None) -> None:
        """Run the guest until it writes ``POWER_OFF_GPA``, every MMIO access in the DMA
        window answered by ``model`` (``await model.access(offset, size,
        write, value)``); ``on_access(offset, write)`` after each."""
        while True:
            reason = self._enter()
            if reason == EXIT_MMIO:
                if self.mmio.is_write and self.mmio.phys_addr == guestbin.POWER_OFF_GPA:
                    return  # powered off: done
                await self._mmio(model, on_access)
            elif reason == EXIT_IO:
                self._floating_port()
            elif reason == EXIT_HLT:
                if self.machine.raised > self.injected:
                    continue  # asleep for the completion interrupt: inject it
                raise KvmError(f"the guest halted with nothing to wake it (rip {self.rip():#x})")
            elif reason in (EXIT_IRQ_WINDOW_OPEN, EXIT_INTR):
                continue
            else:
                raise KvmError(f"vCPU exit {EXIT_REASONS.get(reason, reason)} at rip {self.rip():#x}")

    async def _mmio(self, model: Any, on_access: Any) -> None:
        m = self.mmio
        size, write = min(int(m.len), 8), bool(m.is_write)
        offset = m.phys_addr - DMA_GPA
        if model is None or not 0 <= offset < DMA_REGS:
            value = (1 << 8 * size) - 1  # nothing decodes it: a floating bus
        else:
            value = int.from_bytes(bytes(m.data[:size]), "little") if write else 0
            value = await model.access(offset, size, write, value)
        if not write:
            ctypes.memmove(m.data, value.to_bytes(8, "little", signed=False)[:size].ljust(8, b"\0"), 8)
        if on_access is not None:
            on_access(offset, write)

    def _floating_port(self) -> None:
        io = self.io
        if io.direction == 0:  # in: all ones
            n = io.size * io.count
            if io.data_offset + n <= len(self._map):
                self._map[io.data_offset:io.data_offset + n] = b"\xff" * n

    def rip(self) -> int:
        regs = Regs()
        fcntl.ioctl(self.fd, KVM_GET_REGS, regs)
        return int(regs.rip)

    def close(self) -> None:
        del self.run_page, self.mmio, self.io
        self._map.close()
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()


def run_compute(machine: GuestMachine, length: int) -> tuple[int, float, Counter[str]]:
    """The checksum of ``length`` bytes at the buffer, in the vCPU: (sum,
    seconds from first entry to power-off, exits by reason)."""
    import trio

    machine.set_job(guestbin.Job(guestbin.OP_CHECKSUM, length=length))
    vcpu = Vcpu(machine)
    try:
        t0 = time.perf_counter()
        trio.run(vcpu.run)
        seconds = time.perf_counter() - t0
        return machine.results()["checksum"], seconds, vcpu.exits
    finally:
        vcpu.close()


MECHANISM = "KVM vCPU (hardware virtualization), DMA controller by MMIO exits, completion by injected interrupt"


def run_block(image: str, wl: Any) -> dict[str, Any]:
    """One ``blockload`` workload by the guest driver in a vCPU: a record
    like the trapped modes' plus the mechanism and the exits by reason."""
    import trio

    machine = GuestMachine()
    vcpu = Vcpu(machine)
    try:
        rec = trio.run(guestbin.measure, machine, image, wl, "fullvirt", vcpu.run,
                       lambda: sum(vcpu.exits.values()), True)
    finally:
        vcpu.close()
        machine.close()
    rec.update(mechanism=MECHANISM, exits_by_reason=dict(vcpu.exits), interrupts_injected=vcpu.injected)
    return rec
