"""The benchmark's measuring window: a record always rests on completed
I/O.  A device slower than the window (the emulated disk on a loaded
machine) is measured until it finishes something; a window with nothing
completed raises instead of reporting a rate of zero."""

from __future__ import annotations

import types

import pytest
import trio

from guest_kernel.memory import GuestRam
from pvbus.bench import blockload
from pvbus.bench.blockload import NoCompletedIO, Workload, run_trapped

SECTOR = 512


class SlowDisk:
    """A programmed-I/O disk that makes one exit per sector and then needs
    ``per_sector[k]`` seconds for each sector of its k-th request (the last
    value repeats), counting bytes as the IDE driver does."""

    def __init__(self, kernel: types.SimpleNamespace, *per_sector: float) -> None:
        self.kernel = kernel
        self.per_sector = list(per_sector)
        self.requests = 0
        self.bytes_moved = 0

    async def _sectors(self, n: int) -> None:
        delay = self.per_sector[min(self.requests, len(self.per_sector) - 1)]
        self.requests += 1
        for _ in range(n // SECTOR):
            self.kernel.hypercalls.exits["io"] += 1
            await trio.sleep(delay)
            self.bytes_moved += SECTOR

    async def write(self, offset: int, data: bytes) -> None:
        await self._sectors(len(data))

    async def read(self, offset: int, length: int) -> bytes:
        await self._sectors(length)
        return bytes(length)

    async def transfer(self, write: bool, offset: int, buffer: object) -> None:
        await self._sectors(4096)


def fake_kernel() -> types.SimpleNamespace:
    return types.SimpleNamespace(hypercalls=types.SimpleNamespace(exits={"io": 0}),
                                 synic=types.SimpleNamespace(interrupts=0), ram=GuestRam(1 << 20))


async def test_a_device_slower_than_the_window_is_measured_until_it_moves_data() -> None:
    """The quick run's emulated 4 KiB random write: one request ends just
    after the ramp (the window restarts), the next moves nothing before the
    planned end.  That was recorded as 0 I/Os at exits / 1e-9 per I/O; now
    the window waits for a sector to move and rates what moved."""
    kernel = fake_kernel()
    disk = SlowDisk(kernel, 0.006, 0.5)  # 50 ms for the first request, then 0.5 s a sector
    wl = Workload("randwrite", 4096, 1, 1 << 20, runtime=0.25, ramp=0.02)
    rec = await run_trapped(kernel, wl, "emulated", disk)
    # (on a starved machine the ramp may end before the first request does:
    # then the window counts from the start, which is fine too)
    assert rec["ios"] > 0 and rec["ios"] * 4096 <= disk.bytes_moved
    assert 0 < rec["exits_per_io"] <= 8 * 2  # about one exit per sector, never exits / 1e-9
    assert rec["iops"] * 4096 == pytest.approx(rec["ios"] * 4096 / rec["seconds"], rel=1e-3)


async def test_whole_requests_are_counted_when_each_outlasts_the_window() -> None:
    kernel = fake_kernel()
    disk = SlowDisk(kernel, 0.01)  # 80 ms a request, the window is 10 ms
    wl = Workload("randread", 4096, 1, 1 << 20, runtime=0.01, ramp=0.0)
    rec = await run_trapped(kernel, wl, "fullvirt", disk)  # counted by whole requests
    assert rec["ios"] >= 1 and rec["lat_p50_us"] >= 8 * 10_000 * 0.9
    assert rec["exits_per_io"] == pytest.approx(8, abs=8)


def test_a_window_with_no_completed_io_raises() -> None:
    window = blockload.MeasuringWindow(Workload("read", 4096, 1, runtime=0.0, ramp=0.0))
    assert not window.measured_something()
    with pytest.raises(NoCompletedIO, match="no I/O completed"):
        window.result("native")


def test_a_window_does_not_close_before_an_io_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blockload, "GRACE_SECONDS", 5.0)
    window = blockload.MeasuringWindow(Workload("read", 4096, 1, runtime=0.0, ramp=0.0))
    assert window.going()  # past the end, but nothing measured yet
    window.record(1000)
    assert not window.going()
    assert window.result("native")["ios"] == 1


def test_a_window_gives_up_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blockload, "GRACE_SECONDS", 0.0)
    window = blockload.MeasuringWindow(Workload("read", 4096, 1, runtime=0.0, ramp=0.0))
    assert not window.going()
    with pytest.raises(NoCompletedIO):
        window.result("native")
