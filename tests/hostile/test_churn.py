"""Guests that come and die at every stage leave nothing behind (issue 11,
the churn run): while four good guests run verified storage I/O, guests
connect, go part of the way into the bus (raw guests stopping at a random
stage, real guest kernels killed at a random moment of their boot or work)
and die without a goodbye, many of them by SIGKILL.  Afterwards the host
holds no more fds, threads, memory maps or resident memory than before the
churn (within 5 %), and the good guests saw no error and no wrong byte.

``make test`` runs 30 churning guests; ``make soak`` runs 500."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..bus.harness import HostProcess, guest_command, host_process
from .guests import Census, Progress, settle

GOOD_GUESTS = 4
CHURN_PARALLEL = 6  # churning processes at a time


def _churners(host: HostProcess, lives: int, seed: int) -> None:
    """``lives`` guests: a third real guest kernels killed at a random moment,
    the rest raw guests in churn processes of up to 8 lives each."""
    rng = random.Random(seed)
    killed = lives // 3
    raw = lives - killed
    jobs: list[tuple[str, int]] = [("kill", 1)] * killed
    while raw > 0:
        n = min(raw, rng.randint(2, 8))
        jobs.append(("raw", n))
        raw -= n
    rng.shuffle(jobs)
    running: list[tuple[subprocess.Popen[bytes], float | None]] = []
    while jobs or running:
        while jobs and len(running) < CHURN_PARALLEL:
            kind, n = jobs.pop()
            if kind == "raw":
                proc = subprocess.Popen([sys.executable, "-m", "tests.hostile.churn", host.socket, str(n),
                                         str(rng.randrange(1 << 30))], stdout=subprocess.DEVNULL)
                running.append((proc, None))
            else:
                program = rng.choice(["idle", "echo-load"])
                proc = subprocess.Popen(guest_command(host, program, *(["4"] if program == "echo-load" else [])),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                running.append((proc, time.monotonic() + rng.uniform(0.05, 1.0)))
        time.sleep(0.02)
        for entry in list(running):
            proc, kill_at = entry
            if kill_at is not None and time.monotonic() >= kill_at and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            if proc.poll() is not None:
                running.remove(entry)


def run_churn(tmp_path: Path, lives: int) -> None:
    image = tmp_path / "disk.img"
    stop = tmp_path / "stop"
    with host_process(tmp_path, "--disk", str(image), "--disk-size", "64M") as host:
        good = [subprocess.Popen(guest_command(host, "tests.hostile.guests:verified_io", str(slot), str(GOOD_GUESTS),
                                               str(stop)), stdout=subprocess.PIPE) for slot in range(GOOD_GUESTS)]
        progress = [Progress(p, "ops") for p in good]
        try:
            for p in progress:
                p.wait_started()
            _churners(host, 6, seed=1)  # warm-up: every code path once, caches filled
            assert host.admin({"cmd": "wait", "partitions": GOOD_GUESTS})["ok"]
            base = settle(host.proc.pid, Census.of(host.proc.pid), 0.0, 15)
            _churners(host, lives, seed=2)
            assert host.admin({"cmd": "wait", "partitions": GOOD_GUESTS})["ok"]
            after = settle(host.proc.pid, base, 0.05, 40)
            print(f"host before churn: {base}\nhost after {lives} churning guests: {after}")
            assert after.within(base, 0.05), f"host resources after churn {after} vs before {base}"
            for p in progress:  # the good guests are still working
                assert p.advances_by(20, 30)
        finally:
            stop.touch()
            codes = [p.wait(timeout=120) for p in good]
        results = [p.result for p in progress]
        assert codes == [0] * GOOD_GUESTS, results
        assert all(r is not None and r["ok"] and r["wrong"] == 0 and r["ops"] > 0 for r in results), results


def test_churn(tmp_path: Path) -> None:
    run_churn(tmp_path, 30)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_churn_500(tmp_path: Path) -> None:
    run_churn(tmp_path, 500)
