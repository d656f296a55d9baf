"""One block workload, run natively or through the paravirtual disk.

A workload is fio-like: ``rw`` (read, write, randread, randwrite), ``bs``,
``iodepth``, the ``size`` of the region it covers, ``runtime`` and
``ramp`` seconds.  Both modes issue the same offsets from the same seed.

- native: this process on the image file with ``os.preadv``/``os.pwritev``,
  one request after another (one kernel, no device); the container kind
  runs the same function inside a container (``container.py``).
- paravirt: a guest program keeps ``iodepth`` requests in flight through
  the storvsc driver in two lanes of half the depth each (one lane's batch
  is with the host while the other's is built or reaped); a lane submits
  its requests at once with the vectored ``read_into``/``write_from`` on
  its own guest buffers (one commit and at most one signal per queue),
  waits for them, and repeats.  Each request's latency is its batch's
  submit-to-completion time.

Latencies go into an HDR histogram; exits per I/O come from the guest
kernel's own exit counters.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
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


Counters = Callable[[], tuple[int, int, int]]  # exits, interrupts, bytes moved


def _no_counters() -> tuple[int, int, int]:
    return 0, 0, 0


def _guest_counters(kernel: Any, disk: Any = None) -> Counters:
    """The guest kernel's own exit and interrupt counts (and a PIO disk's bytes)."""
    return lambda: (sum(kernel.hypercalls.exits.values()), kernel.synic.interrupts, getattr(disk, "bytes_moved", 0))


class NoCompletedIO(RuntimeError):
    """A measurement in which no I/O completed: it has no rate to report."""


# How long past its planned end a measurement waits for its first completed
# I/O (a device slowed down by a loaded machine) before it gives up.
GRACE_SECONDS = 60.0


class MeasuringWindow:
    """Ramp, then measure for ``runtime`` seconds: latencies, I/Os, and the
    counters' growth inside the window.  Everything restarts when the ramp
    ends, if the ramp completed anything; a device too slow to finish a
    request within the ramp is measured from the start instead.  The window
    does not close before it holds completed I/O (a request, or with
    ``by_bytes`` a sector's worth of bytes moved): a rate is never computed
    from nothing.  After ``GRACE_SECONDS`` more it closes anyway and
    ``result`` raises ``NoCompletedIO``."""

    def __init__(self, wl: Workload, counters: Counters = _no_counters, *, by_bytes: bool = False) -> None:
        self.wl = wl
        self._counters = counters
        self.by_bytes = by_bytes
        self.start = time.perf_counter()
        self.measuring = self.start + wl.ramp
        self.end = self.measuring + wl.runtime
        self.t_measure: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.ios = 0
        self.hist = _histogram()
        self.base = self._counters()
        self.cpu0 = time.process_time()

    def _moved(self) -> int:
        return self._counters()[2] - self.base[2]

    def measured_something(self) -> bool:
        return self._moved() > 0 if self.by_bytes else self.ios > 0

    def finished(self) -> bool:
        """Past the planned end with completed I/O in hand, or past the grace."""
        now = time.perf_counter()
        return now >= self.end and (self.measured_something() or now >= self.end + GRACE_SECONDS)

    def going(self) -> bool:
        if self.finished():
            return False
        if self.t_measure is None and time.perf_counter() >= self.measuring:
            if self.measured_something():
                self.t_measure = time.perf_counter()
                self._reset()
            else:  # nothing finished in the ramp: the ramp is part of the measurement
                self.t_measure = self.start
        return True

    def record(self, ns: int, count: int = 1) -> None:
        self.hist.record_value(max(1, ns), count)
        self.ios += count

    def result(self, mode: str, **extra: Any) -> dict[str, Any]:
        """The record; with ``by_bytes`` I/Os are counted by the bytes the
        device moved (a request cut off by the end of the window counts for
        its part).  Raises ``NoCompletedIO`` rather than report a rate of
        nothing."""
        wl = self.wl
        seconds = time.perf_counter() - (self.t_measure or self.start)
        exits, interrupts, moved = (now - then for now, then in zip(self._counters(), self.base, strict=True))
        ios = moved / wl.bs if self.by_bytes else self.ios
        if ios <= 0:
            raise NoCompletedIO(f"{mode} {wl.rw} {wl.bs} B QD{wl.iodepth}: no I/O completed in {seconds:.1f} s "
                                f"({exits} exits); the device is stuck or the machine overloaded")
        pct = self.hist.get_value_at_percentile
        finished = self.hist.get_total_count() > 0  # none, for a large emulated request
        return {
            "mode": mode, "rw": wl.rw, "bs": wl.bs, "iodepth": wl.iodepth, "ios": ios, "seconds": round(seconds, 4),
            "iops": ios / seconds, "mb_per_s": ios * wl.bs / seconds / 1e6,
            **{f"lat_{name}_us": pct(p) / 1000 if finished else None
               for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100))},
            "exits_per_io": exits / ios, "interrupts_per_io": interrupts / ios,
            "guest_cpu_s": time.process_time() - self.cpu0, **extra,
        }


def run_native(path: str, wl: Workload, mode: str = "native") -> dict[str, Any]:
    """The workload on ``path`` from this process, one request at a time
    (recorded as ``mode``: ``container`` when this process is one)."""
    fd = os.open(path, (os.O_RDWR if wl.write else os.O_RDONLY) | os.O_CLOEXEC)  # reads never open it for writing
    view = [memoryview(bytearray(os.urandom(wl.bs)))]
    io = os.pwritev if wl.write else os.preadv
    offsets = wl.offsets()
    try:
        window = MeasuringWindow(wl)
        while window.going():
            t0 = time.perf_counter_ns()
            io(fd, view, next(offsets))
            window.record(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
    return window.result(mode, host_cpu_s=0.0)


async def run_paravirt(kernel: Any, wl: Workload) -> dict[str, Any]:
    import trio

    disk = kernel.device("storage")
    # One guest-RAM buffer per request slot, filled once: the zero-copy
    # path, as a guest program doing O_DIRECT I/O on its own pages would.
    buffers = [disk.buffer(wl.bs) for _ in range(wl.iodepth)]
    for b in buffers:
        b.view[:] = os.urandom(wl.bs)
    offsets = wl.offsets()
    window = MeasuringWindow(wl, _guest_counters(kernel))

    transfer = disk.write_from if wl.write else disk.read_into

    async def lane(mine: list[Any]) -> None:
        while window.going():
            where = [next(offsets) for _ in mine]
            t0 = time.perf_counter_ns()
            await transfer(where, mine)  # raises the first BlockError, if any
            window.record(time.perf_counter_ns() - t0, len(mine))

    # Two lanes of iodepth/2 each keep the depth while one lane's requests
    # are with the host and the other's are being built or reaped.
    lanes = 2 if wl.iodepth >= 2 else 1
    async with trio.open_nursery() as nursery:
        for i in range(lanes):
            nursery.start_soon(lane, buffers[i::lanes])
    result = window.result("paravirt", lanes=lanes)
    for b in buffers:
        b.free()
    return result


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
    buffer = DmaBuffer(kernel.ram, wl.bs)
    buffer.view[:] = data
    window = MeasuringWindow(wl, _guest_counters(kernel, disk), by_bytes=mode == "emulated")

    async def stop_when_measured(scope: trio.CancelScope) -> None:
        # Cut the running request off once the window may close: past its end
        # and (emulated) with some bytes moved, so a slow request still counts.
        while not window.finished():
            await trio.sleep(0.005)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_when_measured, nursery.cancel_scope)
        while window.going():
            t0 = time.perf_counter_ns()
            if mode == "fullvirt":
                await disk.transfer(wl.write, next(offsets), buffer)
            elif wl.write:
                await disk.write(next(offsets), data)
            else:
                await disk.read(next(offsets), wl.bs)
            window.record(time.perf_counter_ns() - t0)
        nursery.cancel_scope.cancel()
    buffer.free()
    return window.result(mode)


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
