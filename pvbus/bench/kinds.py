"""``pvbus bench``: one block workload, four kinds of virtualization.

- ``native``: this process on the image file (one shared kernel, no device
  layer: the container case);
- ``paravirt``: the VMBus storage device (rings, batched, signals only on
  transitions);
- ``fullvirt``: an unmodified driver programming the emulated DMA
  controller, every register access a trapped exit, one request at a time;
- ``emulated``: the IDE-like controller by programmed I/O, one exit per
  16-bit data word.

The same image, the same offsets, one run.  Records carry the fields of
``pvbus bench block`` plus p90/p99.9/max latency, interrupts per I/O and
CPU seconds; the default run adds the ring benchmark's transports under
``"ring"``; ``report`` turns the JSON into Markdown and PNG charts.
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

from .blockbench import _cpu_seconds, _find, lay_out, render
from .blockload import Workload, encode, run_native

MODES = ("native", "paravirt", "fullvirt", "emulated")
SIZE = 64 << 20


def matrix(runtime: float, ramp: float) -> list[Workload]:
    return [
        Workload("read", 1 << 20, 4, SIZE, runtime, ramp), Workload("write", 1 << 20, 4, SIZE, runtime, ramp),
        Workload("randread", 4096, 1, SIZE, runtime, ramp), Workload("randwrite", 4096, 1, SIZE, runtime, ramp),
        Workload("randread", 4096, 32, SIZE, runtime, ramp), Workload("randwrite", 4096, 32, SIZE, runtime, ramp),
    ]


def run(workloads: list[Workload], progress: Any = None) -> dict[str, Any]:
    from .ringbench import machine_info

    with tempfile.TemporaryDirectory(prefix="pvbus-kinds-") as tmp:
        image = os.path.join(tmp, "disk.img")
        lay_out(image, max(w.size for w in workloads))
        records = []
        for wl in workloads:
            if progress:
                progress(f"native {wl.rw} {wl.bs} qd{wl.iodepth}")
            records.append(run_native(image, wl))
        sock = os.path.join(tmp, "host.sock")
        host = subprocess.Popen([sys.executable, "-m", "pvbus", "host", "--socket", sock, "--disk", image,
                                 "--device", "storage", "--emulated-disks"], stdout=subprocess.PIPE)
        try:
            assert host.stdout is not None
            if not host.stdout.readline().startswith(b"ready"):
                raise RuntimeError("the host did not start")
            guest = subprocess.Popen(
                [sys.executable, "-m", "pvbus", "guest", "--socket", sock, "--ram", "256", "--program",
                 "pvbus.bench.blockload:guest_program", "--", encode(workloads), "paravirt,fullvirt,emulated"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert guest.stdout is not None
            before = _cpu_seconds(host.pid)
            for line in guest.stdout:
                rec = json.loads(line)
                now = _cpu_seconds(host.pid)
                rec["host_cpu_s"], before = round(now - before, 3), now
                records.append(rec)
                if progress:
                    progress(f"{rec['mode']} {rec['rw']} {rec['bs']} qd{rec['iodepth']}: {rec['mb_per_s']:,.3f} MB/s")
            if guest.wait(timeout=900) != 0:
                raise RuntimeError(guest.stderr.read().decode()[-2000:] if guest.stderr else "guest failed")
        finally:
            host.send_signal(signal.SIGTERM)
            host.wait(timeout=30)
    return {"machine": machine_info(), "records": records, "targets": evaluate(records)}


def evaluate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    pv, em = _find(records, "paravirt", "read", 1 << 20, 4), _find(records, "emulated", "read", 1 << 20, 4)
    if pv and em:
        r = pv["mb_per_s"] / max(em["mb_per_s"], 1e-12)
        out.append({"target": "paravirt / emulated >= 50x, 1 MiB seq read", "ratio": r, "met": r >= 50,
                    "detail": f"{pv['mb_per_s']:,.1f} vs {em['mb_per_s']:,.4f} MB/s"})
    pv, fv = _find(records, "paravirt", "randread", 4096, 32), _find(records, "fullvirt", "randread", 4096, 32)
    if pv and fv:
        r = pv["iops"] / max(fv["iops"], 1e-12)
        out.append({"target": "paravirt / fullvirt >= 2x, 4 KiB rand read QD32", "ratio": r, "met": r >= 2,
                    "detail": f"{pv['iops']:,.0f} vs {fv['iops']:,.0f} IOPS"})
    em = _find(records, "emulated", "randread", 4096, 32)
    if pv and fv and em:
        ordered = em["exits_per_io"] > fv["exits_per_io"] > pv["exits_per_io"]
        out.append({"target": "exits/IO emulated > fullvirt > paravirt, paravirt < 0.05 (QD32)",
                    "ratio": pv["exits_per_io"], "met": ordered and pv["exits_per_io"] < 0.05,
                    "detail": f"{em['exits_per_io']:,.0f} > {fv['exits_per_io']:.1f} > {pv['exits_per_io']:.3f}"})
    return out


def main(json_path: str | None, quick: bool, workloads: list[Workload] | None = None) -> int:
    from rich.console import Console

    from . import ringbench

    default = workloads is None
    if workloads is None:
        workloads = matrix(0.3, 0.05) if quick else matrix(1.0, 0.2)
    with Console(stderr=True).status("starting") as status:
        result = run(workloads, progress=status.update)
        if default:  # the transports under every mode: the ring and its peers
            result["ring"] = ringbench.run(quick=quick, progress=status.update)
    render(result, "pvbus bench: one workload, four kinds of virtualization")
    if "ring" in result:
        ringbench.render(result["ring"])
    result["command"] = "pvbus bench" + (" --quick" if quick else "")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0
