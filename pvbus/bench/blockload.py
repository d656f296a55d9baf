"""One block workload, run natively or through the paravirtual disk.

A workload is fio-like: ``rw`` (read, write, randread, randwrite), ``bs``,
``iodepth``, the ``size`` of the region it covers, ``runtime`` and
``ramp`` seconds.  Both modes issue the same offsets from the same seed.

- native: this process on the image file with ``os.preadv``/``os.pwritev``,
  one request after another (the container case: one kernel, no device).
- paravirt: a guest program submits ``iodepth`` requests at once through
  the storvsc driver (staged on the queues, one commit and at most one
  signal per queue), waits for them, and repeats; each request's latency
  is its batch's submit-to-completion time.

Latencies go into an HDR histogram; exits per I/O come from the guest
kernel's own exit counters.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from hdrh.histogram import HdrHistogram


@dataclass(frozen=True)
class Workload:
    rw: str
    bs: int
    iodepth: int
    size: int = 256 << 20
    runtime: float = 1.0
    ramp: float = 0.2

    @property
    def write(self) -> bool:
        return self.rw in ("write", "randwrite")

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")

    def offsets(self, seed: int = 1) -> Any:
        rng = random.Random(seed)
        slots = self.size // self.bs
        pos = 0
        while True:
            if self.random:
                yield rng.randrange(slots) * self.bs
            else:
                yield pos
                pos = (pos + self.bs) % (slots * self.bs)


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, 60_000_000_000, 3)


class _Clock:
    """Ramp, then measure for ``runtime`` seconds.  ``tick`` says whether to
    go on and whether the measured window just began (counters restart)."""

    def __init__(self, wl: Workload) -> None:
        self.start = time.perf_counter()
        self.measuring = self.start + wl.ramp
        self.end = self.measuring + wl.runtime
        self.t_measure: float | None = None

    def tick(self) -> tuple[bool, bool]:
        now = time.perf_counter()
        if now >= self.end:
            return False, False
        if self.t_measure is None and now >= self.measuring:
            self.t_measure = now
            return True, True
        return True, False

    @property
    def seconds(self) -> float:
        return time.perf_counter() - (self.t_measure or self.start)


def _summary(wl: Workload, mode: str, ios: int, seconds: float, hist: HdrHistogram, extra: dict[str, Any]) -> dict[str, Any]:
    pct = hist.get_value_at_percentile
    if hist.get_total_count() == 0:  # no request finished in time (emulated, large I/O)
        pct = lambda _p: None  # noqa: E731
    return {
        "mode": mode, "rw": wl.rw, "bs": wl.bs, "iodepth": wl.iodepth, "ios": ios, "seconds": round(seconds, 4),
        "iops": ios / seconds, "mb_per_s": ios * wl.bs / seconds / 1e6,
        **{f"lat_{name}_us": None if pct(p) is None else pct(p) / 1000
           for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100))},
        **extra,
    }


def run_native(path: str, wl: Workload) -> dict[str, Any]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    buf = bytearray(os.urandom(wl.bs))
    view = [memoryview(buf)]
    offsets = wl.offsets()
    hist = _histogram()
    ios = 0
    cpu0 = time.process_time()
    try:
        clock = _Clock(wl)
        while True:
            going, restart = clock.tick()
            if not going:
                break
            if restart:
                ios, hist = 0, _histogram()
            t0 = time.perf_counter_ns()
            if wl.write:
                os.pwritev(fd, view, next(offsets))
            else:
                os.preadv(fd, view, next(offsets))
            hist.record_value(max(1, time.perf_counter_ns() - t0))
            ios += 1
        seconds = clock.seconds
    finally:
        os.close(fd)
    return _summary(wl, "native", ios, seconds, hist, {
        "exits_per_io": 0.0, "interrupts_per_io": 0.0, "guest_cpu_s": time.process_time() - cpu0, "host_cpu_s": 0.0})


async def run_paravirt(kernel: Any, wl: Workload) -> dict[str, Any]:
    from guest_kernel.drivers.storvsc import BlockRequest

    disk = kernel.device("storage")
    # One guest-RAM buffer per request slot, filled once: the zero-copy
    # path, as a guest program doing O_DIRECT I/O on its own pages would.
    buffers = [disk.buffer(wl.bs) for _ in range(wl.iodepth)]
    for b in buffers:
        b.view[:] = os.urandom(wl.bs)
    offsets = wl.offsets()
    hist = _histogram()
    ios = 0
    exits0 = interrupts0 = 0
    cpu0 = time.process_time()
    clock = _Clock(wl)
    while True:
        going, restart = clock.tick()
        if not going:
            break
        if restart:
            ios, hist = 0, _histogram()
            exits0 = sum(kernel.hypercalls.exits.values())
            interrupts0 = kernel.synic.interrupts
            cpu0 = time.process_time()
        op = "write" if wl.write else "read"
        batch = [BlockRequest(op, next(offsets), wl.bs, buffer=b) for b in buffers]
        t0 = time.perf_counter_ns()
        for res in await disk.submit(batch):
            if res.error:
                raise res.error
        lat = max(1, time.perf_counter_ns() - t0)
        for _ in batch:
            hist.record_value(lat)
        ios += len(batch)
    seconds = clock.seconds
    for b in buffers:
        b.free()
    exits = sum(kernel.hypercalls.exits.values()) - exits0
    interrupts = kernel.synic.interrupts - interrupts0
    return _summary(wl, "paravirt", ios, seconds, hist, {
        "exits_per_io": exits / max(ios, 1), "interrupts_per_io": interrupts / max(ios, 1),
        "guest_cpu_s": time.process_time() - cpu0})


async def run_trapped(kernel: Any, wl: Workload, mode: str, disk: Any = None) -> dict[str, Any]:
    """The same workload through an emulated controller, one request at a
    time: ``fullvirt`` (DMA disk, a few trapped register accesses per
    request) or ``emulated`` (IDE programmed I/O, one exit per data word).
    ``iodepth`` is recorded but cannot apply: these devices take one
    request at a time.  A request still running when the time is up counts
    for the bytes it moved."""
    import trio

    from guest_kernel.memory import DmaBuffer

    if disk is None:
        disk = await kernel.emulated_disk("dma" if mode == "fullvirt" else "ide")
    data = os.urandom(wl.bs)
    offsets = wl.offsets()
    hist = _histogram()
    clock = _Clock(wl)
    buffer = DmaBuffer(kernel.ram, wl.bs)
    buffer.view[:] = data
    ios = 0.0
    # Counted from the start; restarted when the ramp ends (a slow device may
    # not finish one request within the ramp: then the ramp counts too).
    exits0, interrupts0 = sum(kernel.hypercalls.exits.values()), kernel.synic.interrupts
    moved0 = getattr(disk, "bytes_moved", 0)
    cpu0 = time.process_time()
    with trio.move_on_at(trio.current_time() + wl.ramp + wl.runtime):
        while True:
            going, restart = clock.tick()
            if not going:
                break
            if restart:
                ios, hist = 0.0, _histogram()
                exits0, interrupts0 = sum(kernel.hypercalls.exits.values()), kernel.synic.interrupts
                moved0 = getattr(disk, "bytes_moved", 0)
                cpu0 = time.process_time()
            t0 = time.perf_counter_ns()
            if mode == "fullvirt":
                await disk.transfer(wl.write, next(offsets), buffer)
            elif wl.write:
                await disk.write(next(offsets), data)
            else:
                await disk.read(next(offsets), wl.bs)
            hist.record_value(max(1, time.perf_counter_ns() - t0))
            ios += 1
    if mode == "emulated":
        ios = (disk.bytes_moved - moved0) / wl.bs  # whole and partial requests alike
    buffer.free()
    exits = sum(kernel.hypercalls.exits.values()) - exits0
    interrupts = kernel.synic.interrupts - interrupts0
    result = _summary(wl, mode, 0, clock.seconds, hist, {
        "exits_per_io": exits / max(ios, 1e-9), "interrupts_per_io": interrupts / max(ios, 1e-9),
        "guest_cpu_s": time.process_time() - cpu0})
    result.update(ios=ios, iops=ios / result["seconds"], mb_per_s=ios * wl.bs / result["seconds"] / 1e6)
    return result


async def guest_program(kernel: Any, argv: list[str]) -> int:
    """Guest side of the block benchmarks: argv[0] is a JSON list of workloads,
    argv[1] (optional) a comma-separated list of modes (default paravirt);
    prints one JSON result per line."""
    modes = argv[1].split(",") if len(argv) > 1 else ["paravirt"]
    for spec in json.loads(argv[0]):
        wl = Workload(**spec)
        for mode in modes:
            rec = await run_paravirt(kernel, wl) if mode == "paravirt" else await run_trapped(kernel, wl, mode)
            print(json.dumps(rec), flush=True)
    return 0


def encode(workloads: list[Workload]) -> str:
    return json.dumps([asdict(w) for w in workloads])
