"""Start-up and density: how fast an instance of each kind is up, what it
costs in memory, and how many start within a window.

A kind offers a *launcher*: ``launch(image) -> Instance``, blocking until
the instance has completed its first I/O (4 KiB at offset 0 of the image,
its SHA-256 reported back and checked here against the image), or raising.
An ``Instance`` says how long that took, which processes are its own
(``pids``) and how to stop it (``stop``, by PID, safe on every path).
Kinds in this module:

- ``container``: ``container.start`` with the first-I/O task (the
  processes are the cgroup's);
- ``process``: the plain process, the container's fallback;
- ``paravirt``: a ``pvbus host`` offering the image read-only and a
  ``pvbus guest`` (64 MiB of RAM) whose program reads through storvsc.

Measurements:

- ``startup``: launch to first completed I/O, one instance alone,
  ``repeats`` times (median);
- memory per instance: the PSS of all its processes (``Pss`` of
  ``/proc/PID/smaps_rollup``: shared pages are split between their
  sharers, so instances side by side are charged fairly), averaged over
  the instances up at the end of the density run;
- ``density``: instances launched back to back, ``parallel`` launches in
  flight, each left running once up, until ``window`` seconds pass or
  ``cap`` instances are up (the cap is recorded: a count at the cap means
  "at least"), or the machine's available memory falls under
  ``MEMORY_FLOOR``.  An instance not up by the end of the window does not
  count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from . import container

WINDOW = 10.0  # seconds
CAP, QUICK_CAP = 64, 16
MEMORY_FLOOR = 2 << 30  # stop launching below this much available memory
GUEST_RAM_MIB = 64


@dataclass
class Instance:
    first_io_s: float
    pids: Callable[[], set[int]]
    stop: Callable[[], None]


Launcher = Callable[[str], Instance]


class LaunchFailed(RuntimeError):
    pass


def first_block_digest(image: str) -> str:
    with open(image, "rb") as f:
        return hashlib.sha256(f.read(container.FIRST_IO_BYTES)).hexdigest()


def _checked(image: str, digest: str) -> None:
    if digest != first_block_digest(image):
        raise LaunchFailed(f"the first I/O read other bytes than the image holds ({digest[:12]})")


def _first_io_line(proc: subprocess.Popen[bytes], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read().decode()[-500:] if proc.stderr else ""
        raise LaunchFailed(f"{what} ended before its first I/O: {err.strip()}")
    return str(json.loads(line)["first_io"])


def _kill(procs: list[subprocess.Popen[bytes]], sig: int = signal.SIGKILL) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=15)
        if p.poll() is None:
            p.kill()
            p.wait()
        for pipe in (p.stdin, p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


def _tree(procs: list[subprocess.Popen[bytes]]) -> set[int]:
    import psutil

    pids = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(p.pid)
            pids |= {top.pid, *(c.pid for c in top.children(recursive=True))}
    return pids


def launch_container(image: str) -> Instance:
    t0 = time.perf_counter()
    box = container.start(image, {"first_io": True})
    try:
        digest = _first_io_line(box.process, "the container")
        took = time.perf_counter() - t0
        _checked(image, digest)
    except BaseException:
        box.stop()
        raise
    return Instance(took, box.pids, box.stop)


def launch_process(image: str) -> Instance:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pvbus.bench.density", image],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        digest = _first_io_line(proc, "the process")
        took = time.perf_counter() - t0
        _checked(image, digest)
    except BaseException:
        _kill([proc])
        raise
    return Instance(took, lambda: _tree([proc]), lambda: _kill([proc]))


def launch_paravirt(image: str) -> Instance:
    tmp = tempfile.mkdtemp(prefix="pvbus-density-")
    sock = os.path.join(tmp, "host.sock")
    pvbus = [sys.executable, "-m", "pvbus"]
    procs: list[subprocess.Popen[bytes]] = []

    def stop() -> None:
        _kill(procs[1:])  # the guest first, then the host asked to stop
        _kill(procs[:1], signal.SIGTERM)
        with contextlib.suppress(OSError):
            os.unlink(sock)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)

    t0 = time.perf_counter()
    try:
        procs.append(subprocess.Popen([*pvbus, "host", "--disk", image, "--read-only", "--device", "storage",
                                       "--socket", sock], stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        assert procs[0].stdout is not None
        if not procs[0].stdout.readline().startswith(b"ready"):
            raise LaunchFailed("the host did not start")
        procs.append(subprocess.Popen([*pvbus, "guest", "--socket", sock, "--ram", str(GUEST_RAM_MIB),
                                       "--program", "pvbus.bench.density:guest_first_io"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        digest = _first_io_line(procs[1], "the guest")
        took = time.perf_counter() - t0
        _checked(image, digest)
    except BaseException:
        stop()
        raise
    return Instance(took, lambda: _tree(procs), stop)


async def guest_first_io(kernel: Any, argv: list[str]) -> int:
    """Guest program: read the disk's first block, say its digest, rest."""
    import trio

    data = await kernel.device("storage").read(0, container.FIRST_IO_BYTES)
    print(json.dumps({"first_io": hashlib.sha256(data).hexdigest()}), flush=True)
    await trio.sleep_forever()
    return 0


def pss_bytes(pids: set[int]) -> int:
    """The summed PSS of ``pids`` (a process gone meanwhile counts nothing)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def startup(launch: Launcher, image: str, repeats: int) -> dict[str, Any]:
    """One instance alone, ``repeats`` times: launch to first completed I/O,
    and its PSS once up."""
    times, pss = [], []
    for _ in range(repeats):
        inst = launch(image)
        try:
            times.append(inst.first_io_s)
            pss.append(pss_bytes(inst.pids()))
        finally:
            inst.stop()
    return {"startup_s": statistics.median(times), "startup_runs_s": [round(t, 4) for t in times],
            "pss_alone_bytes": statistics.median(pss)}


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def density(launch: Launcher, image: str, window: float = WINDOW, cap: int = CAP,
            parallel: int | None = None) -> dict[str, Any]:
    """How many instances are up ``window`` seconds after the first launch,
    and the PSS of each of them side by side."""
    parallel = parallel or max(1, os.cpu_count() or 1)
    up: list[Instance] = []
    late: list[Instance] = []
    failures: list[str] = []
    stopped_by = "window"
    t0 = time.perf_counter()
    deadline = t0 + window
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        flying: set[Future[Instance]] = set()
        launched = 0
        try:
            while True:
                while (len(flying) < parallel and launched < cap and time.perf_counter() < deadline
                       and _available_memory() > MEMORY_FLOOR):
                    flying.add(pool.submit(launch, image))
                    launched += 1
                if not flying:
                    break
                done, flying = wait(flying, timeout=max(0.0, deadline - time.perf_counter()) + 0.05,
                                    return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        inst = fut.result()
                    except Exception as e:  # noqa: BLE001 - a launch that failed is counted, not fatal
                        failures.append(str(e)[:200])
                        continue
                    (up if time.perf_counter() <= deadline else late).append(inst)
                if time.perf_counter() > deadline and flying:
                    for fut in flying:  # up too late: they still have to be stopped
                        with contextlib.suppress(Exception):
                            late.append(fut.result(timeout=120))
                    flying = set()
            if launched >= cap:
                stopped_by = "cap"
            elif _available_memory() <= MEMORY_FLOOR:
                stopped_by = "memory floor"
            elapsed = time.perf_counter() - t0
            pss = [pss_bytes(inst.pids()) for inst in up]
        finally:
            for fut in flying:
                with contextlib.suppress(Exception):
                    late.append(fut.result(timeout=120))
            for inst in [*up, *late]:
                inst.stop()
    return {"instances_up": len(up), "window_s": window, "cap": cap, "parallel_launches": parallel,
            "stopped_by": stopped_by, "all_up_after_s": round(elapsed, 3) if stopped_by == "cap" else None,
            "late": len(late), "failures": failures[:5], "failed": len(failures),
            "pss_per_instance_bytes": statistics.mean(pss) if pss else None,
            "startup_in_crowd_s": statistics.median(i.first_io_s for i in up) if up else None}


def measure(launchers: dict[str, Launcher], image: str, quick: bool, progress: Any = None) -> dict[str, Any]:
    """Start-up and density of every kind offered, on ``image``."""
    out = {}
    for kind, launch in launchers.items():
        if progress:
            progress(f"start-up of one {kind} instance")
        rec = startup(launch, image, 1 if quick else 3)
        if progress:
            progress(f"{kind} instances started within {WINDOW:g} s")
        rec.update(density(launch, image, cap=QUICK_CAP if quick else CAP))
        out[kind] = rec
    return out


def _plain_first_io(image: str) -> int:
    """The plain process's first I/O, then rest until stdin closes."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    print(json.dumps({"first_io": hashlib.sha256(os.pread(fd, container.FIRST_IO_BYTES, 0)).hexdigest()}),
          flush=True)
    sys.stdin.read()
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(_plain_first_io(sys.argv[1]))
