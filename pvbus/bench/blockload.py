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
    return {
        "mode": mode, "rw": wl.rw, "bs": wl.bs, "iodepth": wl.iodepth, "ios": ios, "seconds": round(seconds, 4),
        "iops": ios / seconds, "mb_per_s": ios * wl.bs / seconds / 1e6,
        "lat_p50_us": pct(50) / 1000, "lat_p90_us": pct(90) / 1000, "lat_p99_us": pct(99) / 1000,
        "lat_p999_us": pct(99.9) / 1000, "lat_max_us": hist.get_max_value() / 1000, **extra,
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


async def guest_program(kernel: Any, argv: list[str]) -> int:
    """Guest side of ``pvbus bench block``: argv[0] is a JSON list of workloads;
    prints one JSON result per line."""
    for spec in json.loads(argv[0]):
        print(json.dumps(await run_paravirt(kernel, Workload(**spec))), flush=True)
    return 0


def encode(workloads: list[Workload]) -> str:
    return json.dumps([asdict(w) for w in workloads])
