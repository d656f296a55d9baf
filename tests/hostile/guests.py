"""Guests for the hostile-guest tests: a verified storage workload (a guest
program), a raw guest that opens a channel by hand, a watcher of a good
guest's progress, and the host-side resource census the leak checks use."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import trio

from vmbus import hv
from vmbus import protocol as P
from vmbus.device import load_devices

from ..bus.harness import RawGuest

BLOCK = 4096


def pattern(seed: int, offset: int, generation: int) -> bytes:
    """The bytes a guest writes at ``offset`` in write number ``generation``."""
    return hashlib.blake2b(f"{seed}:{offset}:{generation}".encode(), digest_size=64).digest() * (BLOCK // 64)


async def verified_io(kernel: Any, argv: list[str]) -> int:
    """Guest program: ``-- SLOT SLOTS STOPFILE``: random 4 KiB writes and reads
    in this guest's 1/SLOTS of the disk until STOPFILE exists, every read
    checked against what this guest wrote there; then every block read back
    and checked.  Prints progress lines {"t", "ops"} and a last line
    {"ok", "ops", "wrong", "blocks"}."""
    slot, slots, stop = int(argv[0]), int(argv[1]), argv[2]
    disk = kernel.device("storage")
    region = (disk.capacity // slots) // BLOCK * BLOCK
    base = slot * region
    blocks = region // BLOCK
    rng = random.Random(os.getpid())
    written: dict[int, int] = {}  # block -> generation
    ops = wrong = 0
    last_report = 0.0
    while not os.path.exists(stop):
        b = rng.randrange(blocks)
        if rng.random() < 0.5 or b not in written:
            gen = written.get(b, -1) + 1
            await disk.write(base + b * BLOCK, pattern(slot, b, gen))
            written[b] = gen
        else:
            wrong += await disk.read(base + b * BLOCK, BLOCK) != pattern(slot, b, written[b])
        ops += 1
        if time.monotonic() - last_report > 0.2:
            last_report = time.monotonic()
            print(json.dumps({"t": last_report, "ops": ops}), flush=True)
    chunk = 256  # blocks per read for the final check
    for first in range(0, blocks, chunk):
        data = await disk.read(base + first * BLOCK, min(chunk, blocks - first) * BLOCK)
        for b in range(first, first + len(data) // BLOCK):
            if b in written:
                wrong += data[(b - first) * BLOCK : (b - first + 1) * BLOCK] != pattern(slot, b, written[b])
    print(json.dumps({"ok": wrong == 0, "ops": ops, "wrong": wrong, "blocks": len(written)}), flush=True)
    return 0 if wrong == 0 else 1


async def echo_progress(kernel: Any, argv: list[str]) -> int:
    """Guest program: echo with 4 requests in flight until killed, every answer
    checked; prints {"t": CLOCK_MONOTONIC seconds, "echoes": N} every 0.1 s
    (the clock is the machine's, so a test can tell which counts were
    reached after a given moment)."""
    echo = kernel.device("echo")
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        i = 0
        while True:
            data = f"{os.getpid()}-{k}-{i}".encode()
            if await echo.echo(data) != data:
                raise RuntimeError("an echo came back wrong")
            i += 1
            done += 1

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(worker, k)
        while True:
            print(json.dumps({"t": time.monotonic(), "echoes": done}), flush=True)
            await trio.sleep(0.1)


class Progress:
    """Reads a guest's JSON progress lines ({"t": ..., KEY: N}) on a thread."""

    def __init__(self, proc: subprocess.Popen[bytes], key: str) -> None:
        self.proc = proc
        self.key = key
        self.samples: list[tuple[float, int]] = []  # (the guest's monotonic time, count)
        self.result: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if self.key in line and "t" in line:
                self.samples.append((float(line["t"]), int(line[self.key])))
            else:
                self.result = line

    @property
    def count(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def advances_by(self, n: int, timeout: float) -> bool:
        """Whether the guest completes ``n`` more after this moment, within
        ``timeout`` seconds: counted only from samples the guest took after
        now, so nothing done before (and reported late) counts."""
        now = time.monotonic()
        deadline = now + timeout
        while time.monotonic() < deadline:
            after = [count for t, count in self.samples if t > now]
            if after and after[-1] - after[0] >= n:
                return True
            time.sleep(0.02)
        return False

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.count == 0 and self.proc.poll() is None:
            assert time.monotonic() < deadline, "the guest never reported progress"
            time.sleep(0.02)
        assert self.proc.poll() is None, "the guest exited before it reported progress"


def offer_of(g: RawGuest, device: str) -> P.OfferChannel:
    """The offer for ``device`` among those a raw guest received."""
    wanted = P.guid_to_wire(load_devices()[device].interface_id)
    for m in g.messages:
        if isinstance(m, P.OfferChannel) and m.if_type == wanted:
            return m
    raise AssertionError(f"no {device} offer among {g.messages}")


async def open_channel(g: RawGuest, device: str, gpadl: int = 0x100, ring_pages: int = 4) -> tuple[int, int]:
    """Contact, take the offers, open ``device``'s channel on zeroed rings and
    fetch its event port.  Returns (relid, the channel's eventfd)."""
    await g.contact()
    assert await g.post(P.RequestOffers()) == hv.HvStatus.SUCCESS
    await g.expect(P.AllOffersDelivered)
    offer = offer_of(g, device)
    relid = offer.child_relid
    pfn = g.ram.alloc(2 * ring_pages)
    for m in P.gpadl_messages(relid, gpadl, list(range(pfn, pfn + 2 * ring_pages)), 2 * ring_pages * 4096):
        assert await g.post(m) == hv.HvStatus.SUCCESS
    assert (await g.expect(P.GpadlCreated)).creation_status == P.STATUS_SUCCESS
    assert await g.post(P.OpenChannel(relid, 1, gpadl, 0, ring_pages)) == hv.HvStatus.SUCCESS
    assert (await g.expect(P.OpenChannelResult)).status == P.STATUS_SUCCESS
    fd = await g.hv.connect_event_port(offer.connection_id)
    return relid, fd


@dataclass
class Census:
    """What a host process holds, from /proc."""

    fds: int
    threads: int
    maps: int
    rss: int
    rss_shmem: int = 0  # of rss: pages of guests' RAM the host has touched

    @classmethod
    def of(cls, pid: int) -> Census:
        with open(f"/proc/{pid}/maps") as f:
            maps = sum(1 for _ in f)
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
        return cls(
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            threads=int(status["Threads"]),
            maps=maps,
            rss=int(status["VmRSS"].split()[0]) << 10,
            rss_shmem=int(status["RssShmem"].split()[0]) << 10,
        )

    @property
    def rss_own(self) -> int:
        """Resident memory of the host's own: without the pages of guests'
        RAM it maps (those are the guests' memfds, and the good guests' share
        grows as they touch more of their RAM; their mappings are counted
        in ``maps``)."""
        return self.rss - self.rss_shmem

    def within(self, base: Census, fraction: float) -> bool:
        return all(
            getattr(self, f) <= getattr(base, f) * (1 + fraction)
            for f in ("fds", "threads", "maps", "rss_own")
        )


def settle(pid: int, base: Census, fraction: float, timeout: float) -> Census:
    """The host's census once it is back within ``fraction`` of ``base``
    (or the last one seen at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        now = Census.of(pid)
        if now.within(base, fraction) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def fds_pointing_at(pid: int, path: str) -> int:
    real = os.path.realpath(path)
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == real:
                n += 1
        except OSError:
            pass
    return n


def run_trio(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args)
