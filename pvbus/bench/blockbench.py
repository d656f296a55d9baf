"""``pvbus bench block``: the same block workloads natively and through the
paravirtual disk, in one run, and the storage targets as ratios.

It lays out a disk image (written in full, so reads hit real data), runs
each workload natively in this process, then starts a ``pvbus host`` on the
same image and a ``pvbus guest`` running ``blockload.guest_program`` with
the same workloads, and collects both sides' records (``pvbus bench``
reuses this with the emulated modes added).

Only an image this module creates is laid out: ``lay_out`` refuses a path
that exists.  A caller may instead bring an existing disk (``image=``), used
as it is, offered read-only unless ``read_only=False``; ``disk_size`` gives
its size (a regular file's length, a block device's capacity).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .blockload import Workload, encode, run_native
from .tables import num, print_table, render_targets

FULL = [
    Workload("read", 4096, 4), Workload("write", 4096, 4),
    Workload("read", 65536, 4), Workload("write", 65536, 4),
    Workload("read", 1 << 20, 4), Workload("write", 1 << 20, 4),
    Workload("randread", 4096, 1), Workload("randwrite", 4096, 1),
    Workload("randread", 4096, 32), Workload("randwrite", 4096, 32),
]
DEMO = [Workload("read", 1 << 20, 4, runtime=0.5), Workload("write", 1 << 20, 4, runtime=0.5),
        Workload("randread", 4096, 32, runtime=0.5), Workload("randwrite", 4096, 32, runtime=0.5)]


def _quick(workloads: list[Workload], runtime: float) -> list[Workload]:
    return [Workload(w.rw, w.bs, w.iodepth, w.size, runtime, min(w.ramp, 0.1)) for w in workloads]


def lay_out(path: str, size: int) -> None:
    """Create ``path`` and fill it with ``size`` bytes of random data; a path
    that exists is never touched (``FileExistsError``)."""
    chunk = os.urandom(1 << 20)
    with open(path, "xb") as f:
        try:
            for _ in range(size // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(path)  # made here and unfinished: not left behind
            raise


def disk_size(path: str) -> int:
    """The size of an existing image or block device, opened read-only."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def run_guest(image: str, workloads: list[Workload], modes: tuple[str, ...] = ("paravirt",),
              progress: Any = None, read_only: bool = False) -> list[dict[str, Any]]:
    """Start a host on ``image`` (with the emulated controllers when a mode
    needs them, offering it read-only if asked) and a guest running
    ``blockload.guest_program``; return its records, each with the host's
    CPU seconds spent meanwhile."""
    import psutil

    host_cmd = [sys.executable, "-m", "pvbus", "host", "--disk", image, "--device", "storage"]
    if set(modes) - {"paravirt"}:
        host_cmd.append("--emulated-disks")
    if read_only:
        host_cmd.append("--read-only")
    with tempfile.TemporaryDirectory(prefix="pvbus-bench-") as tmp:
        sock = os.path.join(tmp, "host.sock")
        host = subprocess.Popen([*host_cmd, "--socket", sock], stdout=subprocess.PIPE)
        try:
            assert host.stdout is not None
            if not host.stdout.readline().startswith(b"ready"):
                raise RuntimeError("the host did not start")
            host_cpu = psutil.Process(host.pid)
            guest = subprocess.Popen(
                [sys.executable, "-m", "pvbus", "guest", "--socket", sock, "--ram", "512", "--program",
                 "pvbus.bench.blockload:guest_program", "--", encode(workloads), ",".join(modes)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert guest.stdout is not None
            records = []
            before = sum(host_cpu.cpu_times()[:2])
            for line in guest.stdout:
                rec = json.loads(line)
                now = sum(host_cpu.cpu_times()[:2])
                rec["host_cpu_s"], before = round(now - before, 3), now  # includes the workload's ramp
                records.append(rec)
                if progress:
                    progress(f"{rec['mode']} {rec['rw']} {rec['bs']} qd{rec['iodepth']}: {rec['mb_per_s']:,.3f} MB/s")
            if guest.wait(timeout=900) != 0:
                raise RuntimeError(f"guest failed: {guest.stderr.read().decode()[-2000:] if guest.stderr else ''}")
            return records
        finally:
            host.send_signal(signal.SIGTERM)
            host.wait(timeout=30)


def run(workloads: list[Workload], progress: Any = None, image: str | None = None,
        modes: tuple[str, ...] = ("paravirt",), targets: Any = None, read_only: bool = True) -> dict[str, Any]:
    """Native in this process, then ``modes`` through a guest, on one image:
    by default a temporary one laid out here (and removed after); else
    ``image``, an existing disk used as it is, offered read-only unless
    ``read_only`` is False (the caller runs only reads on a read-only one).
    ``targets`` turns the records into the targets list."""
    from .ringbench import machine_info

    size = max(w.size for w in workloads)
    with tempfile.TemporaryDirectory(prefix="pvbus-disk-") as tmp:
        if image is None:
            path = os.path.join(tmp, "bench.img")
            if progress:
                progress(f"laying out a {size >> 20} MiB image")
            lay_out(path, size)
            read_only = False
        else:
            path = image
            if read_only and any(wl.write for wl in workloads):
                raise ValueError("write workloads on a disk offered read-only")
        records = []
        for wl in workloads:
            if progress:
                progress(f"native {wl.rw} {wl.bs} qd{wl.iodepth}")
            records.append(run_native(path, wl))
        records += run_guest(path, workloads, modes, progress, read_only=read_only)
    return {"machine": machine_info(), "records": records, "targets": (targets or evaluate)(records)}


def find_record(records: list[dict[str, Any]], mode: str, rw: str, bs: int, qd: int) -> dict[str, Any] | None:
    return next((r for r in records if (r["mode"], r["rw"], r["bs"], r["iodepth"]) == (mode, rw, bs, qd)), None)


def evaluate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    pv, nat = find_record(records, "paravirt", "read", 1 << 20, 4), find_record(records, "native", "read", 1 << 20, 4)
    if pv and nat:
        r = pv["mb_per_s"] / nat["mb_per_s"]
        out.append({"target": "seq 1 MiB read QD4 >= 0.9x native MB/s", "ratio": r, "met": r >= 0.9,
                    "detail": f"{num(pv['mb_per_s'])} vs {num(nat['mb_per_s'])} MB/s"})
    pv = find_record(records, "paravirt", "randread", 4096, 32)
    nat = find_record(records, "native", "randread", 4096, 32)
    if pv and nat:
        r = pv["iops"] / nat["iops"]
        out.append({"target": "rand 4 KiB read QD32 >= 0.5x native IOPS", "ratio": r, "met": r >= 0.5,
                    "detail": f"{num(pv['iops'])} vs {num(nat['iops'])} IOPS"})
        out.append({"target": "<= 0.05 exits per I/O at QD32", "ratio": pv["exits_per_io"],
                    "met": pv["exits_per_io"] <= 0.05, "detail": num(pv["exits_per_io"])})
    return out


COLUMNS = ("mode", "rw", "bs", "qd", "IOPS", "MB/s", "p50 us", "p99 us", "exits/IO")
NUMERIC = (False, False, True, True, True, True, True, True, True)


def rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per record, every number in the one format of ``tables.num``."""
    return [[r["mode"], r["rw"], size_label(r["bs"]), str(r["iodepth"]), num(r["iops"]), num(r["mb_per_s"]),
             num(r["lat_p50_us"]), num(r["lat_p99_us"]), num(r["exits_per_io"])]
            for r in sorted(result["records"], key=lambda r: (r["rw"], r["bs"], r["iodepth"], r["mode"]))]


def render(result: dict[str, Any], title: str, console: Any = None) -> None:
    print_table(title, COLUMNS, rows(result), NUMERIC, console)
    render_targets(console, result.get("targets", []))


def render_demo(result: dict[str, Any], console: Any = None) -> None:
    """The ``pvbus run`` demo: the numbers and what they are, no verdicts (the
    targets belong to ``make bench``, with runs long enough to judge)."""
    title = "pvbus run: a guest's disk over VMBus beside the same I/O done natively"
    print_table(title, COLUMNS, rows(result), NUMERIC, console)
    seconds = max(r.get("seconds", 0) for r in result["records"])
    text = (
        "\nWhat ran: each workload once in this process on the image file (native), then in a guest\n"
        "process through its paravirtual SCSI disk to a host process serving the same image (paravirt),\n"
        f"each for about {seconds:.1f} s.  exits/IO counts the guest's trips to the host per request.\n"
        "These are short runs on a machine that other programs share: the ratios between native and\n"
        "paravirt move from run to run.  `make bench` runs the full benchmarks and checks the targets."
    )
    print(text, file=_file(console), flush=True)


def _file(console: Any) -> Any:
    return console.file if console is not None else sys.stdout


def size_label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K" if n >= 1024 else str(n)


def main(json_path: str | None, quick: bool) -> int:
    from rich.console import Console

    workloads = _quick(FULL, 0.3) if quick else FULL
    with Console(stderr=True).status("starting") as status:
        result = run(workloads, progress=status.update)
    render(result, "pvbus bench block: native vs paravirtual disk, same image, one run")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0


# -- fio: the real tool inside a guest against /dev/pvbus/disk0, and natively -------------------

FIO_JOBS = [("read", 1 << 20, 1), ("read", 1 << 20, 32), ("randread", 4096, 1), ("randread", 4096, 32)]
FIO_RUNTIME = 3.0  # seconds per job (--quick: 1)
FIO_SIZE = 256 << 20


def fio_command(filename: str, size: int, runtime: float, ramp: float = 0.5) -> list[str]:
    """One fio run of ``FIO_JOBS`` one after another (stonewall), O_DIRECT
    with libaio, JSON on stdout."""
    argv = ["fio", "--output-format=json", f"--filename={filename}", f"--size={size}", "--direct=1",
            "--ioengine=libaio", "--time_based", f"--runtime={runtime:g}", f"--ramp_time={ramp:g}", "--randrepeat=0"]
    for rw, bs, qd in FIO_JOBS:
        argv += [f"--name={rw}-{size_label(bs)}-qd{qd}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--stonewall"]
    return argv


def fio_records(report: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """fio's JSON report as bench records (IOPS, MB/s, completion latency)."""
    out = []
    for job, (rw, bs, qd) in zip(report["jobs"], FIO_JOBS, strict=True):
        read = job["read"]
        pct = read.get("clat_ns", {}).get("percentile", {})
        out.append({"mode": mode, "rw": rw, "bs": bs, "iodepth": qd, "iops": read["iops"],
                    "mb_per_s": read["bw_bytes"] / 1e6, "lat_p50_us": pct.get("50.000000", 0) / 1000,
                    "lat_p99_us": pct.get("99.000000", 0) / 1000, "exits_per_io": 0.0, "engine": "fio"})
    return out


def run_fio_in_guest(image: str, size: int, runtime: float, ramp: float = 0.5) -> list[dict[str, Any]]:
    """fio inside a guest (``pvbus guest --exec``) against its disk's file."""
    with tempfile.TemporaryDirectory(prefix="pvbus-bench-") as tmp:
        sock = os.path.join(tmp, "host.sock")
        host = subprocess.Popen([sys.executable, "-m", "pvbus", "host", "--disk", image, "--device", "storage",
                                 "--socket", sock], stdout=subprocess.PIPE)
        try:
            assert host.stdout is not None
            if not host.stdout.readline().startswith(b"ready"):
                raise RuntimeError("the host did not start")
            guest = subprocess.run([sys.executable, "-m", "pvbus", "guest", "--socket", sock, "--ram", "256",
                                    "--exec", "--", *fio_command("/dev/pvbus/disk0", size, runtime, ramp)],
                                   capture_output=True, timeout=600)
            if guest.returncode != 0:
                raise RuntimeError(f"fio in the guest failed: {guest.stderr.decode()[-2000:]}")
            return fio_records(json.loads(guest.stdout), "guest-fio")
        finally:
            host.send_signal(signal.SIGTERM)
            host.wait(timeout=30)


def evaluate_fio(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rw, bs, qd, key, least, label in [("read", 1 << 20, 1, "mb_per_s", 0.5, "seq 1 MiB read QD1"),
                                          ("read", 1 << 20, 32, "mb_per_s", 0.5, "seq 1 MiB read QD32"),
                                          ("randread", 4096, 32, "iops", 0.2, "rand 4 KiB read QD32")]:
        guest, native = find_record(records, "guest-fio", rw, bs, qd), find_record(records, "native-fio", rw, bs, qd)
        if guest and native and native[key]:
            r = guest[key] / native[key]
            unit = "MB/s" if key == "mb_per_s" else "IOPS"
            out.append({"target": f"fio {label} in a guest >= {least}x native fio {unit}", "ratio": r,
                        "met": r >= least, "detail": f"{num(guest[key])} vs {num(native[key])} {unit}"})
    return out


FIO_NOTE = (
    "\nWhat ran: the same fio jobs (O_DIRECT, libaio) natively on the image file (native-fio), in a guest\n"
    "against /dev/pvbus/disk0 (guest-fio: FUSE -> the guest kernel's storvsc -> VMBus -> the host), and the\n"
    "same workloads through the guest's block API without FUSE (paravirt).  Where the time goes: native-fio\n"
    "is the host's storage; paravirt minus native is the driver, the bus and the host process; guest-fio\n"
    "minus paravirt is FUSE: a kernel round trip to the guest process and two copies per request."
)


def main_fio(json_path: str | None, quick: bool) -> int:
    """``pvbus bench block --fio``: fio natively and in a guest, side by side."""
    import shutil

    from rich.console import Console

    from .ringbench import machine_info

    if shutil.which("fio") is None:
        raise RuntimeError("fio is not installed (apt-get install fio, or make system-packages)")
    runtime = 1.0 if quick else FIO_RUNTIME
    size = FIO_SIZE
    with Console(stderr=True).status("starting") as status, tempfile.TemporaryDirectory(prefix="pvbus-disk-") as tmp:
        path = os.path.join(tmp, "bench.img")
        status.update(f"laying out a {size >> 20} MiB image")
        lay_out(path, size)
        status.update("fio natively on the image")
        native = subprocess.run(fio_command(path, size, runtime), capture_output=True, check=True, timeout=600)
        records = fio_records(json.loads(native.stdout), "native-fio")
        status.update("fio in a guest on /dev/pvbus/disk0")
        records += run_fio_in_guest(path, size, runtime)
        status.update("the same workloads through the block API in a guest")
        workloads = [Workload(rw, bs, qd, size, runtime) for rw, bs, qd in FIO_JOBS]
        records += run_guest(path, workloads, progress=status.update)
    result = {"machine": machine_info(), "records": records, "targets": evaluate_fio(records)}
    render(result, "pvbus bench block --fio: fio natively and in a guest on its paravirtual disk")
    print(FIO_NOTE, flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0
