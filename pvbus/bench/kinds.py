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
from pathlib import Path
from typing import Any

from . import blockbench
from .blockbench import find_record, render
from .blockload import Workload
from .tables import num

MODES = ("native", "paravirt", "fullvirt", "emulated")
SIZE = 64 << 20


def matrix(runtime: float, ramp: float) -> list[Workload]:
    return [
        Workload("read", 1 << 20, 4, SIZE, runtime, ramp), Workload("write", 1 << 20, 4, SIZE, runtime, ramp),
        Workload("randread", 4096, 1, SIZE, runtime, ramp), Workload("randwrite", 4096, 1, SIZE, runtime, ramp),
        Workload("randread", 4096, 32, SIZE, runtime, ramp), Workload("randwrite", 4096, 32, SIZE, runtime, ramp),
    ]


def run(workloads: list[Workload], progress: Any = None) -> dict[str, Any]:
    return blockbench.run(workloads, progress, modes=MODES[1:], targets=evaluate)


def evaluate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    pv, em = find_record(records, "paravirt", "read", 1 << 20, 4), find_record(records, "emulated", "read", 1 << 20, 4)
    if pv and em:
        r = pv["mb_per_s"] / max(em["mb_per_s"], 1e-12)
        out.append({"target": "paravirt / emulated >= 50x, 1 MiB seq read", "ratio": r, "met": r >= 50,
                    "detail": f"{num(pv['mb_per_s'])} vs {num(em['mb_per_s'])} MB/s"})
    pv = find_record(records, "paravirt", "randread", 4096, 32)
    fv = find_record(records, "fullvirt", "randread", 4096, 32)
    if pv and fv:
        r = pv["iops"] / max(fv["iops"], 1e-12)
        out.append({"target": "paravirt / fullvirt >= 2x, 4 KiB rand read QD32", "ratio": r, "met": r >= 2,
                    "detail": f"{num(pv['iops'])} vs {num(fv['iops'])} IOPS"})
    em = find_record(records, "emulated", "randread", 4096, 32)
    if pv and fv and em:
        ordered = em["exits_per_io"] > fv["exits_per_io"] > pv["exits_per_io"]
        out.append({"target": "exits/IO emulated > fullvirt > paravirt, paravirt < 0.05 (QD32)",
                    "ratio": pv["exits_per_io"], "met": ordered and pv["exits_per_io"] < 0.05,
                    "detail": f"{num(em['exits_per_io'])} > {num(fv['exits_per_io'])} > {num(pv['exits_per_io'])}"})
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
