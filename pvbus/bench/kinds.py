"""``pvbus bench``: one block workload, the kinds of virtualization side by side.

A kind is run by a ``KindRunner``: the record modes it produces, a
``run(image, workloads, progress)`` returning its records and, per mode,
what it used (``mechanism``) and why a real mechanism was missing
(``fallback``, never silent), and the launchers its modes offer to the
start-up and density measurement (``density.Launcher``).  ``RUNNERS`` is
the list the run goes through, in order; a new kind is one more runner.

- ``native``: this process on the image file (the host itself: the
  baseline, not a kind of virtualization);
- ``container``: the same function inside a real container
  (``container.py``: namespaces and a cgroup); where the machine cannot
  make one, the plain process under the mode ``container (plain process)``
  with the reason;
- ``paravirt``: the VMBus storage device (rings, batched, signals only on
  transitions);
- ``fullvirt``: an unmodified driver programming the emulated DMA
  controller, every register access a trapped exit, one request at a time;
- ``emulated``: the IDE-like controller by programmed I/O, one exit per
  16-bit data word.

The same image, the same offsets, one run.  Records carry the fields of
``pvbus bench block`` plus p90/p99.9/max latency, interrupts per I/O and
CPU seconds; the JSON adds ``kinds`` (mechanism per mode), ``startup``
(start-up, memory and density per mode, default matrix only) and the
ordering checks among the targets; the default run adds the ring
benchmark's transports under ``"ring"``; ``report`` turns the JSON into
Markdown and PNG charts.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import container, density, hwkinds
from .blockbench import find_record, lay_out, render, run_guest
from .blockload import Workload, run_native
from .tables import num

CONTAINER_FALLBACK = "container (plain process)"
GUEST_MODES = ("paravirt", "fullvirt", "emulated")
SIZE = 64 << 20
MUCH_MORE = 10  # "fullvirt >> paravirt": at least this many times the exits per I/O

Records = list[dict[str, Any]]
Progress = Any


@dataclass
class KindRunner:
    modes: tuple[str, ...]
    run: Callable[[str, list[Workload], Progress], tuple[Records, dict[str, dict[str, Any]]]]
    launchers: Callable[[], dict[str, density.Launcher]] = field(default=lambda: {})


def _run_native(image: str, workloads: list[Workload], progress: Progress) -> tuple[Records, dict[str, Any]]:
    records = []
    for wl in workloads:
        if progress:
            progress(f"native {wl.rw} {wl.bs} qd{wl.iodepth}")
        records.append(run_native(image, wl))
    return records, {"native": {"mechanism": "this process on the image file (the host itself)", "fallback": None}}


def _run_container(image: str, workloads: list[Workload], progress: Progress) -> tuple[Records, dict[str, Any]]:
    missing = container.unavailable()
    if missing is not None:
        records = [run_native(image, wl, mode=CONTAINER_FALLBACK) for wl in workloads]
        return records, {CONTAINER_FALLBACK: {"mechanism": "plain process: no namespaces, no cgroup",
                                              "fallback": missing}}
    seen = container.run_workloads(image, workloads, progress)
    inside, host = seen["identity"], seen["host"]
    info = {"mechanism": container.mechanism(), "fallback": None, "inside": inside, "host": host,
            "cgroup_usage": seen["cgroup_usage"],
            "shares_host_kernel": inside["kernel"] == host["kernel"],
            "own_namespaces": sorted(ns for ns in container.NAMESPACES
                                     if inside["namespaces"][ns] != host["namespaces"][ns])}
    return seen["records"], {"container": info}


def _container_launchers() -> dict[str, density.Launcher]:
    if container.unavailable() is not None:
        return {CONTAINER_FALLBACK: density.launch_process}
    return {"container": density.launch_container}


GUEST_MECHANISMS = {
    "paravirt": "VMBus guest and host processes: storvsc over shared-memory rings, guest RAM in a memfd",
    "fullvirt": "trapped model: the guest's DMA-controller driver, each register access an exit over the "
                "control socket",
    "emulated": "trapped model: IDE programmed I/O, each 16-bit data word an exit over the control socket",
}


def _run_guest(image: str, workloads: list[Workload], progress: Progress) -> tuple[Records, dict[str, Any]]:
    # fullvirt in KVM and emulated under a CPU emulator where they are usable;
    # the trapped models otherwise, each labelled a fallback with the reason
    real, missing = hwkinds.plan()
    trapped = tuple(m for m in GUEST_MODES if m not in real)
    records = run_guest(image, workloads, trapped, progress)
    info = {m: {"mechanism": GUEST_MECHANISMS[m], "fallback": missing.get(m)} for m in trapped}
    hw_records, hw_info = hwkinds.run(image, workloads, progress, real)
    return records + hw_records, {**info, **hw_info}


RUNNERS: list[KindRunner] = [
    KindRunner(("native",), _run_native, lambda: {"native": density.launch_process}),
    KindRunner(("container", CONTAINER_FALLBACK), _run_container, _container_launchers),
    KindRunner(GUEST_MODES, _run_guest, lambda: {"paravirt": density.launch_paravirt}),
]


def matrix(runtime: float, ramp: float) -> list[Workload]:
    return [
        Workload("read", 1 << 20, 4, SIZE, runtime, ramp), Workload("write", 1 << 20, 4, SIZE, runtime, ramp),
        Workload("randread", 4096, 1, SIZE, runtime, ramp), Workload("randwrite", 4096, 1, SIZE, runtime, ramp),
        Workload("randread", 4096, 32, SIZE, runtime, ramp), Workload("randwrite", 4096, 32, SIZE, runtime, ramp),
    ]


def run(workloads: list[Workload], progress: Progress = None, *, startup: bool = False,
        quick: bool = False) -> dict[str, Any]:
    """Every runner on one image laid out here (and removed after); with
    ``startup``, start-up and density of every kind that offers a launcher."""
    from .ringbench import machine_info

    size = max(w.size for w in workloads)
    records: Records = []
    kinds: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="pvbus-disk-") as tmp:
        image = os.path.join(tmp, "bench.img")
        if progress:
            progress(f"laying out a {size >> 20} MiB image")
        lay_out(image, size)
        for runner in RUNNERS:
            recs, info = runner.run(image, workloads, progress)
            records += recs
            kinds.update(info)
        if startup:
            launchers = {m: launch for runner in RUNNERS for m, launch in runner.launchers().items()}
            result["startup"] = density.measure(launchers, image, quick, progress)
    result.update(records=records, kinds=kinds)
    result["compute"] = hwkinds.compute(8 << 20 if quick else 32 << 20)
    result["targets"] = evaluate(records) + ordering(result)
    return result


def evaluate(records: Records) -> list[dict[str, Any]]:
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


def exits_per_io(records: Records, mode: str) -> float | None:
    """A mode's exits per I/O over all its workloads (total exits / total I/Os)."""
    mine = [r for r in records if r["mode"] == mode and r.get("ios")]
    if not mine:
        return None
    return float(sum(r["exits_per_io"] * r["ios"] for r in mine) / sum(r["ios"] for r in mine))


def container_mode(result: dict[str, Any]) -> str:
    return CONTAINER_FALLBACK if CONTAINER_FALLBACK in result.get("kinds", {}) else "container"


def ordering(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The orderings the kinds must show, computed from this run."""
    out = []
    cmode = container_mode(result)
    ex = {m: exits_per_io(result["records"], m) for m in ("emulated", "fullvirt", "paravirt", cmode)}
    if all(v is not None for v in ex.values()):
        em, fv, pv, ct = (ex[m] or 0.0 for m in ("emulated", "fullvirt", "paravirt", cmode))
        met = em >= fv and fv >= MUCH_MORE * pv and pv > ct and ct == 0
        out.append({"target": f"exits/IO emulated >= fullvirt >> paravirt > {cmode} = 0 (all workloads; >> is "
                              f">= {MUCH_MORE}x)", "ratio": fv / pv if pv else None, "met": met,
                    "detail": f"{num(em)} >= {num(fv)} >> {num(pv)} > {num(ct)}"})
    st = result.get("startup", {})
    if cmode in st and "paravirt" in st:
        c, p = st[cmode]["startup_s"], st["paravirt"]["startup_s"]
        out.append({"target": f"start-up {cmode} < paravirtual guest (launch to first I/O)", "ratio": p / c,
                    "met": c < p, "detail": f"{num(c * 1000)} ms vs {num(p * 1000)} ms"})
    return out


def render_startup(startup: dict[str, Any], console: Any = None) -> None:
    from .tables import print_table

    rows = [[mode, num(s["startup_s"] * 1000), num(s["pss_alone_bytes"] / 2**20),
             num((s["pss_per_instance_bytes"] or 0) / 2**20), f"{s['instances_up']} (cap {s['cap']})",
             s["stopped_by"]] for mode, s in startup.items()]
    print_table(f"start-up and density (instances up within {density.WINDOW:g} s)",
                ("kind", "start-up ms", "PSS MiB alone", "PSS MiB side by side", "instances up", "stopped by"),
                rows, (False, True, True, True, True, False), console)


def main(json_path: str | None, quick: bool, workloads: list[Workload] | None = None) -> int:
    from rich.console import Console

    from . import ringbench

    default = workloads is None
    if workloads is None:
        workloads = matrix(0.3, 0.05) if quick else matrix(1.0, 0.2)
    with Console(stderr=True).status("starting") as status:
        result = run(workloads, progress=status.update, startup=default, quick=quick)
        if default:  # the transports under every mode: the ring and its peers
            result["ring"] = ringbench.run(quick=quick, progress=status.update)
    render(result, "pvbus bench: one workload, the kinds of virtualization side by side")
    for mode, info in result["kinds"].items():
        if info.get("fallback"):
            print(f"{mode}: fallback, {info['mechanism']} ({info['fallback']})", flush=True)
    if "startup" in result:
        render_startup(result["startup"])
    if "ring" in result:
        ringbench.render(result["ring"])
    result["command"] = "pvbus bench" + (" --quick" if quick else "")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0
