"""The guest machine code (``guestcode/``) and the machine it runs in.

``guestcode/`` holds freestanding C that knows nothing of pvbus: a driver
for the DMA disk controller that programs its registers (MMIO at
``DMA_GPA``) and a compute routine (a checksum of guest memory).  Here we
find its binaries (``make -C guestcode`` leaves them in ``guestcode/build``;
if they are missing or older than the sources they are built into a
temporary directory for this process, never into the tree) and lay out a
``GuestMachine``: guest RAM in a sealed memfd, the binary at ``CODE_GPA``,
the job block the guest reads, an LBA list and a data buffer.  The KVM and
the emulator back ends (``kvm``, ``emulator``) run the same machine under
the same device model (``host_drivers.emulated.dma.DmaDisk``).

The layout mirrors ``guestcode/layout.h``.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbus.guest_memory import GuestMemory
from vmbus.protocols.emulated_disks import DMA_BASE

GUESTCODE = Path(__file__).resolve().parents[2] / "guestcode"
SOURCES = ("dmadrv.c", "checksum.c", "checksum.h", "layout.h", "x86_64.ld", "aarch64.ld", "Makefile")
X86_BINARY, NATIVE_LIBRARY, ARM_BINARY = "dmadrv-x86_64.bin", "libchecksum.so", "checksum-aarch64.bin"

# guestcode/layout.h
GDT_GPA, IDT_GPA, DMA_GPA, JOB_GPA, STACK_TOP, CODE_GPA = 0x800, 0x400, DMA_BASE, 0x5000, 0x8000, 0x10000
MMIO_HOLE = (DMA_GPA, 0x1000)  # one page left out of RAM: the controller's registers
IRQ_VECTOR = 0x20
POWER_OFF_GPA = 0x1800  # MMIO in the hole, outside the controller: a write here, the guest is done
LBA_LIST_GPA, BUFFER_GPA = 0x20000, 0x100000
MAX_LBAS = (BUFFER_GPA - LBA_LIST_GPA) // 8
OP_READ, OP_WRITE, OP_CHECKSUM = 1, 2, 3
JOB_IN = ("op", "blocks", "buffer", "nlbas", "lba_list", "stride", "use_irq", "max_requests", "length", "stop")
JOB_OUT = ("requests", "errors", "last_status", "checksum", "interrupts", "capacity", "finished")
JOB_OUT_AT = JOB_GPA + 16 * 8
PAGE = 4096


class GuestCodeUnavailable(RuntimeError):
    """The guest code cannot be built here (no compiler, no source tree)."""


_built: dict[str, Path] = {}


def _fresh(out: Path) -> bool:
    target = out / X86_BINARY
    if not target.exists() or not (out / NATIVE_LIBRARY).exists():
        return False
    newest = max((GUESTCODE / s).stat().st_mtime for s in SOURCES)
    return target.stat().st_mtime >= newest


def build_dir() -> Path:
    """Where the binaries are: ``guestcode/build`` when fresh, else a
    temporary directory built once per process (removed at exit)."""
    if "dir" in _built:
        return _built["dir"]
    if not (GUESTCODE / "dmadrv.c").exists():
        raise GuestCodeUnavailable(f"no guest code sources at {GUESTCODE}")
    if _fresh(GUESTCODE / "build"):
        _built["dir"] = GUESTCODE / "build"
        return _built["dir"]
    if shutil.which("gcc") is None or shutil.which("make") is None:
        raise GuestCodeUnavailable("gcc or make is missing: the guest code cannot be built")
    out = Path(tempfile.mkdtemp(prefix="pvbus-guestcode-"))
    atexit.register(shutil.rmtree, out, True)
    done = subprocess.run(["make", "-s", "-C", str(GUESTCODE), f"OUT={out}"], capture_output=True, text=True)
    if done.returncode != 0 or not (out / X86_BINARY).exists():
        raise GuestCodeUnavailable(f"building the guest code failed: {(done.stderr or done.stdout).strip()[-500:]}")
    _built["dir"] = out
    return out


def binary(name: str) -> bytes:
    path = build_dir() / name
    if not path.exists():
        raise GuestCodeUnavailable(f"{name} was not built (for aarch64: no cross compiler, see guestcode/README.md)")
    return path.read_bytes()


def native_checksum() -> Any:
    """The same checksum compiled for this host, as a callable (address, words) -> int."""
    import ctypes

    lib = ctypes.CDLL(str(build_dir() / NATIVE_LIBRARY))
    fn = lib.pv_checksum
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    return fn


def checksum_reference(data: bytes) -> int:
    """FNV-1a over 64-bit little-endian words, as guestcode/checksum.c (for tests)."""
    h = 0xCBF29CE484222325
    for (w,) in struct.iter_unpack("<Q", data):
        h = ((h ^ w) * 0x100000001B3) & (1 << 64) - 1
    return h


@dataclass
class Job:
    op: int
    blocks: int = 0
    buffer: int = BUFFER_GPA
    lbas: tuple[int, ...] = ()
    stride: int = 0
    use_irq: bool = False
    max_requests: int = 0
    length: int = 0


class GuestMachine:
    """Guest RAM (a sealed memfd of ``ram`` bytes) holding the x86-64 guest
    code and one job.  ``memory`` is what the device model DMAs into;
    ``interrupt`` is how the model raises its line (the back end delivers
    it, or counts it where the guest polls)."""

    def __init__(self, ram: int = 64 << 20, code: bytes | None = None) -> None:
        fd = os.memfd_create("pvbus-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, ram)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.memory = GuestMemory(fd, ram)  # owns the fd from here on
        except BaseException:
            os.close(fd)
            raise
        self.ram = ram
        self.raised = 0
        self.load(CODE_GPA, binary(X86_BINARY) if code is None else code)

    @property
    def buffer_capacity(self) -> int:
        return self.ram - BUFFER_GPA

    def load(self, gpa: int, data: bytes) -> None:
        self.memory.view(gpa, len(data))[:] = data

    def interrupt(self, flag: int) -> None:
        self.raised += 1

    def set_job(self, job: Job) -> None:
        if len(job.lbas) > MAX_LBAS:
            raise ValueError(f"at most {MAX_LBAS} LBAs in a job")
        if job.buffer + max(job.length, job.blocks * 512 + job.stride * max(len(job.lbas) - 1, 0)) > self.ram:
            raise ValueError("the job's buffer does not fit in guest RAM")
        fields = (job.op, job.blocks, job.buffer, len(job.lbas), LBA_LIST_GPA, job.stride, int(job.use_irq),
                  job.max_requests, job.length, 0)
        struct.pack_into("<10Q", self.memory.view(JOB_GPA, 10 * 8), 0, *fields)
        self.memory.view(JOB_OUT_AT, len(JOB_OUT) * 8)[:] = bytes(len(JOB_OUT) * 8)
        if job.lbas:
            self.load(LBA_LIST_GPA, struct.pack(f"<{len(job.lbas)}Q", *job.lbas))

    def stop(self) -> None:
        """Ask the guest to end its loop after the current request (it reads
        the flag once per request; the store is a plain one: the vCPU sees
        it on its next load of the job block, there is no ordering to keep
        with anything else)."""
        struct.pack_into("<Q", self.memory.view(JOB_GPA + JOB_IN.index("stop") * 8, 8), 0, 1)

    def results(self) -> dict[str, int]:
        values = struct.unpack_from(f"<{len(JOB_OUT)}Q", self.memory.view(JOB_OUT_AT, len(JOB_OUT) * 8))
        return dict(zip(JOB_OUT, values, strict=True))

    def close(self) -> None:
        self.memory.close()


def lba_list(offsets: Any, count: int) -> tuple[int, ...]:
    """The first ``count`` byte offsets of a workload as LBAs."""
    return tuple(next(offsets) // 512 for _ in range(min(count, MAX_LBAS)))


# -- block jobs: the driver against the DMA controller's device model --------------------------

INT_ACK = 0x30  # the register a request's completion ends with (both completion modes)


async def run_job(machine: GuestMachine, image: str, job: Job, drive: Any, *, writable: bool,
                  on_access: Any = None) -> dict[str, int]:
    """Run ``job`` to the guest's power-off with ``drive(model, on_access)``
    (a back end's ``run``), the device model serving ``image``."""
    from host_drivers.emulated.dma import DmaDisk
    from host_drivers.storage.backend import DiskImage

    machine.set_job(job)
    model = DmaDisk(DiskImage(image, read_only=not writable), machine)
    try:
        await drive(model, on_access)
    finally:
        model.close()
    return machine.results()


def copy_job(size: int, bs: int, write: bool) -> Job:
    """Every block of a ``size``-byte disk, in order, between the disk and
    one contiguous buffer (each request ``bs`` bytes further on)."""
    return Job(OP_WRITE if write else OP_READ, bs // 512, lbas=tuple(range(0, size // 512, bs // 512)), stride=bs,
               max_requests=size // bs)


async def measure(machine: GuestMachine, image: str, wl: Any, mode: str, drive: Any, exits: Any,
                  use_irq: bool) -> dict[str, Any]:
    """One workload of ``blockload`` through the guest driver: the same
    offsets (as LBAs, used in turn), one request at a time; a request's
    latency is the time between consecutive completions (the driver's
    whole cycle); the guest is told to stop when the window closes."""
    import time

    from .blockload import MeasuringWindow

    count = MAX_LBAS if wl.random else max(1, wl.size // wl.bs)
    if wl.write:
        machine.load(BUFFER_GPA, os.urandom(wl.bs))
    job = Job(OP_WRITE if wl.write else OP_READ, wl.bs // 512, lbas=lba_list(wl.offsets(), count), use_irq=use_irq)
    window = MeasuringWindow(wl, lambda: (exits(), machine.raised, 0))
    last = [time.perf_counter_ns()]

    def on_access(offset: int, write: bool) -> None:
        if write and offset == INT_ACK:
            now = time.perf_counter_ns()
            window.record(now - last[0])
            last[0] = now
            if not window.going():
                machine.stop()

    await run_job(machine, image, job, drive, writable=wl.write, on_access=on_access)
    rec = window.result(mode)
    rec["host_cpu_s"] = rec["guest_cpu_s"]  # the vCPU and the device model are one process: one figure for both
    return rec
