"""Verdicts on the seed's pros and cons of each kind, computed from one run.

Every row of the seed table (``ROWS``: kind, pro or con, claim) gets a
function of the run's JSON that returns the figure it rests on and a
verdict computed from it: ``backed`` or ``not backed in this run`` (with
the numbers and, where the run contradicts the claim, why), or ``not
measured in this run`` when the run has no kind or demonstration that
could show it.  No verdict is a literal: each comes from a comparison.

A demonstration another kind provides (a foreign-architecture guest, a
refused one under hardware virtualization) arrives in the JSON under
``demonstrations``: ``{name: {"shown": bool, "detail": str}}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .tables import num

BACKED, NOT_BACKED, NOT_MEASURED = "backed", "not backed in this run", "not measured in this run"
VIRTUAL = ("emulated", "fullvirt", "paravirt")


@dataclass(frozen=True)
class Verdict:
    kind: str
    side: str  # pro / con
    claim: str
    figure: str
    verdict: str


def _label(r: dict[str, Any]) -> str:
    bs = r["bs"]
    size = f"{bs >> 20}M" if bs >= 1 << 20 else f"{bs >> 10}K"
    return f"{r['rw']} {size} qd{r['iodepth']}"


class Run:
    """The run's figures, looked up by mode and workload."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        self.kinds: dict[str, Any] = result.get("kinds", {})
        self.container = "container (plain process)" if "container (plain process)" in self.kinds else "container"
        self.by = {(r["mode"], _label(r)): r for r in result["records"] if r.get("ios", 1)}
        self.labels = list(dict.fromkeys(_label(r) for r in result["records"]))
        self.startup: dict[str, Any] = result.get("startup", {})

    def has(self, *modes: str) -> bool:
        present = {m for m, _ in self.by}
        return all(m in present for m in modes)

    def rec(self, mode: str, label: str) -> dict[str, Any] | None:
        return self.by.get((mode, label))

    def common(self, *modes: str) -> list[str]:
        return [lab for lab in self.labels if all((m, lab) in self.by for m in modes)]

    def exits(self, mode: str) -> float:
        mine = [r for (m, _), r in self.by.items() if m == mode]
        return float(sum(r["exits_per_io"] * r["ios"] for r in mine) / max(sum(r["ios"] for r in mine), 1e-12))

    def cpu_us_per_io(self, mode: str) -> float | None:
        mine = [r for (m, _), r in self.by.items() if m == mode]
        if not mine or any(r.get("guest_cpu_s") is None for r in mine):
            return None
        cpu = sum(r.get("guest_cpu_s", 0.0) + (r.get("host_cpu_s") or 0.0) for r in mine)
        return float(cpu / sum(r["ios"] for r in mine) * 1e6)


def _rate(r: dict[str, Any]) -> tuple[float, str]:
    """The figure that matters for a workload: MB/s for 1 MiB, IOPS else."""
    return (r["mb_per_s"], "MB/s") if r["bs"] >= 1 << 20 else (r["iops"], "IOPS")


def _faster_everywhere(run: Run, fast: str, slow: str) -> tuple[bool, str, list[str]]:
    """Whether ``fast`` beats ``slow`` on every workload both ran, the figures,
    and the workloads where it does not."""
    parts, losses = [], []
    for lab in run.common(fast, slow):
        f, unit = _rate(run.by[fast, lab])
        s, _ = _rate(run.by[slow, lab])
        parts.append(f"{lab}: {num(f)} vs {num(s)} {unit} ({num(f / max(s, 1e-12))}x)")
        if f <= s:
            losses.append(lab)
    return bool(parts) and not losses, "; ".join(parts), losses


def _missing(*modes: str) -> str:
    return f"{NOT_MEASURED}: no {', '.join(modes)} records"


def _demo(run: Run, name: str, what: str) -> tuple[str, str]:
    d = run.result.get("demonstrations", {}).get(name)
    if not d:
        return f"this run has no {what}", NOT_MEASURED
    return d["detail"], BACKED if d["shown"] else f"{NOT_BACKED}: {d['detail']}"


# -- hardware emulation ---------------------------------------------------------------------------------------------


def emulation_any_guest(run: Run) -> tuple[str, str]:
    return _demo(run, "foreign_architecture", "guest built for another architecture")


def emulation_unmodified(run: Run) -> tuple[str, str]:
    if not run.has("emulated"):
        return "", _missing("emulated")
    ex = run.exits("emulated")
    return (f"the emulated guest's driver programs the IDE controller's registers, {num(ex)} register accesses "
            f"per I/O ({run.kinds.get('emulated', {}).get('mechanism', '')})",
            BACKED if ex > 0 else f"{NOT_BACKED}: no register access was counted")


def emulation_slow(run: Run) -> tuple[str, str]:
    if not run.has("emulated", "paravirt"):
        return "", _missing("emulated", "paravirt")
    ok, fig, losses = _faster_everywhere(run, "paravirt", "emulated")
    fig = f"paravirtual vs emulated, {fig}; {num(run.exits('emulated'))} exits per I/O"
    return fig, BACKED if ok else f"{NOT_BACKED}: emulation kept up at {', '.join(losses)}"


# -- full virtualization ----------------------------------------------------------------------------------------------


def fullvirt_unmodified(run: Run) -> tuple[str, str]:
    if not run.has("fullvirt"):
        return "", _missing("fullvirt")
    ex = run.exits("fullvirt")
    return (f"the guest's driver programs a DMA controller register by register ({num(ex)} trapped accesses per "
            f"I/O); mechanism: {run.kinds.get('fullvirt', {}).get('mechanism', '')}",
            BACKED if ex > 0 else f"{NOT_BACKED}: no trapped access was counted")


def fullvirt_faster_than_emulation(run: Run) -> tuple[str, str]:
    if not run.has("fullvirt", "emulated"):
        return "", _missing("fullvirt", "emulated")
    ok, fig, losses = _faster_everywhere(run, "fullvirt", "emulated")
    return f"full virtualization vs emulation, {fig}", BACKED if ok else f"{NOT_BACKED}: slower at {', '.join(losses)}"


def fullvirt_trapped(run: Run) -> tuple[str, str]:
    if not run.has("fullvirt", "paravirt"):
        return "", _missing("fullvirt", "paravirt")
    fv, pv = run.exits("fullvirt"), run.exits("paravirt")
    return (f"{num(fv)} exits per I/O (every register access), against {num(pv)} paravirtual",
            BACKED if fv >= 1 and fv > pv else f"{NOT_BACKED}: {num(fv)} exits per I/O")


def fullvirt_same_hardware(run: Run) -> tuple[str, str]:
    return _demo(run, "foreign_architecture_refused", "attempt to run a foreign-architecture guest on hardware "
                                                       "virtualization")


def fullvirt_every_driver(run: Run) -> tuple[str, str]:
    if not run.has("fullvirt", "emulated"):
        return "", _missing("fullvirt", "emulated")
    return ("the host had to model two controllers register by register (DMA disk controller, IDE) for the "
            "unmodified drivers; the paravirtual guest needed one VMBus device speaking requests",
            BACKED)


# -- paravirtualization --------------------------------------------------------------------------------------------


def paravirt_fast(run: Run) -> tuple[str, str]:
    if not run.has("paravirt", "fullvirt"):
        return "", _missing("paravirt", "fullvirt")
    pv, fv = run.exits("paravirt"), run.exits("fullvirt")
    ok, fig, losses = _faster_everywhere(run, "paravirt", "fullvirt")
    few = pv * 10 <= fv
    text = f"{num(pv)} exits per I/O against {num(fv)} full virtualization; {fig}"
    if ok and few:
        return text, BACKED
    why = [] if few else [f"exits {num(pv)} not 10x below {num(fv)}"]
    why += [f"slower at {', '.join(losses)}"] if losses else []
    return text, f"{NOT_BACKED}: {'; '.join(why)}"


def paravirt_efficient(run: Run) -> tuple[str, str]:
    pv, fv = run.cpu_us_per_io("paravirt"), run.cpu_us_per_io("fullvirt")
    if pv is None or fv is None:
        return "", _missing("paravirt", "fullvirt")
    return (f"guest + host CPU per I/O over all workloads: {num(pv)} us paravirtual, {num(fv)} us full "
            f"virtualization", BACKED if pv < fv else f"{NOT_BACKED}: {num(pv)} us >= {num(fv)} us")


def paravirt_modified(run: Run) -> tuple[str, str]:
    if not run.has("paravirt"):
        return "", _missing("paravirt")
    return ("the paravirtual disk is reached only by a driver written for the bus (guest_kernel/drivers/storvsc.py, "
            "VMBus rings and GPADLs): no register of any controller is touched, "
            f"{num(run.exits('paravirt'))} exits per I/O", BACKED)


def paravirt_limited_os(run: Run) -> tuple[str, str]:
    return ("the run has one guest kernel, this project's own; how many OSes have a driver is not a figure a "
            "benchmark can produce", NOT_MEASURED)


# -- containers ---------------------------------------------------------------------------------------------------


def container_fastest(run: Run) -> tuple[str, str]:
    c = run.container
    others = [m for m in VIRTUAL if run.has(m)]
    if not run.has(c) or not others:
        return "", _missing(c, *VIRTUAL)
    figs, losses = [], []
    for m in others:
        ok, fig, lost = _faster_everywhere(run, c, m)
        if m == "paravirt":
            figs.append(f"{c} vs {m}, {fig}")
        losses += [f"{m} at {lab}" for lab in lost]
    if run.has("native"):
        ratios = [_rate(run.by[c, lab])[0] / max(_rate(run.by["native", lab])[0], 1e-12)
                  for lab in run.common(c, "native")]
        figs.append(f"{c} / native from {num(min(ratios))}x to {num(max(ratios))}x")
    if not losses:
        return "; ".join(figs), BACKED
    return "; ".join(figs), (
        f"{NOT_BACKED}: beaten by {', '.join(losses)}. The container's workload is one Python thread doing one "
        "request at a time, while the paravirtual guest keeps the queue depth in flight and its host serves "
        "them in C on the other core: with large transfers the copy dominates and two processes on two cores "
        "move more than one. The container's own path is the host's (its ratio to native above; its writes are "
        "also charged, as dirty page cache, to its memory limit)")


def container_startup(run: Run) -> tuple[str, str]:
    c, st = run.container, run.startup
    if c not in st or "paravirt" not in st:
        return "", f"{NOT_MEASURED}: no start-up figures for {c} and paravirt"
    cs, ps = st[c], st["paravirt"]
    fig = (f"launch to first I/O {num(cs['startup_s'] * 1000)} ms vs {num(ps['startup_s'] * 1000)} ms paravirtual "
           f"guest; PSS per instance {num(cs['pss_alone_bytes'] / 2**20)} MiB vs "
           f"{num(ps['pss_alone_bytes'] / 2**20)} MiB")
    ok = cs["startup_s"] < ps["startup_s"] and cs["pss_alone_bytes"] < ps["pss_alone_bytes"]
    return fig, BACKED if ok else f"{NOT_BACKED}: not both faster and smaller"


def container_scale(run: Run) -> tuple[str, str]:
    c, st = run.container, run.startup
    if c not in st or "paravirt" not in st:
        return "", f"{NOT_MEASURED}: no density figures for {c} and paravirt"
    cs, ps = st[c], st["paravirt"]

    def said(s: dict[str, Any]) -> str:
        at_cap = s["stopped_by"] == "cap"
        return (f"{s['instances_up']}{' (the cap: at least)' if at_cap else ''} up within {num(s['window_s'])} s"
                + (f", all in {num(s['all_up_after_s'])} s" if at_cap else ""))

    fig = f"{c}: {said(cs)}; paravirtual guests: {said(ps)}"
    ok = cs["instances_up"] > ps["instances_up"] or (
        cs["instances_up"] == ps["instances_up"] and cs["stopped_by"] == "cap"
        and (cs["all_up_after_s"] or 0) < (ps["all_up_after_s"] or float("inf")))
    return fig, BACKED if ok else f"{NOT_BACKED}: the paravirtual guests kept up"


def _container_view(run: Run) -> dict[str, Any] | None:
    info = run.kinds.get("container") if run.container == "container" else None
    return info if info and info.get("inside") else None


def container_shared_kernel(run: Run) -> tuple[str, str]:
    info = _container_view(run)
    if not info:
        return "", f"{NOT_MEASURED}: {run.kinds.get(run.container, {}).get('fallback', 'no container')}"
    k_in, k_out = info["inside"]["kernel"], info["host"]["kernel"]
    ex = run.exits("container")
    return (f"`uname -r` inside {k_in}, outside {k_out}; {num(ex)} exits per I/O: its read is the host kernel's "
            "system call, so a fault in that kernel is a fault under every container",
            BACKED if k_in == k_out and ex == 0 else f"{NOT_BACKED}: kernels {k_in} / {k_out}, {num(ex)} exits")


def container_match_kernel(run: Run) -> tuple[str, str]:
    info = _container_view(run)
    if not info:
        return "", f"{NOT_MEASURED}: {run.kinds.get(run.container, {}).get('fallback', 'no container')}"
    k_in, k_out = info["inside"]["kernel"], info["host"]["kernel"]
    return (f"the container runs on the host's kernel {k_out} (inside: {k_in}); it has no kernel of its own to choose",
            BACKED if k_in == k_out else f"{NOT_BACKED}: {k_in} inside")


def container_weaker_security(run: Run) -> tuple[str, str]:
    info = _container_view(run)
    if not info or not run.has("fullvirt"):
        return "", f"{NOT_MEASURED}: needs the container and fullvirt records"
    inside = info["inside"]
    fv = run.exits("fullvirt")
    fig = (f"isolated by namespaces ({', '.join(info['own_namespaces'])} differ from the host's; PID "
           f"{inside['pid']}, host name {inside['hostname']}, {len(inside['processes'])} process(es) visible, "
           f"interfaces {', '.join(inside['net_interfaces'])}) but every I/O enters the shared kernel as a system "
           f"call with the full system-call interface exposed; the full-virtualization guest reaches the host only "
           f"through {num(fv)} exits per I/O into one device model")
    ok = set(info["own_namespaces"]) == {"mnt", "pid", "uts", "ipc", "net"} and fv > 0
    return fig, BACKED if ok else f"{NOT_BACKED}: namespaces {info['own_namespaces']}"


ROWS: list[tuple[str, str, str, Callable[[Run], tuple[str, str]]]] = [
    ("hardware emulation", "pro", "any guest OS, even one incompatible with the host's hardware", emulation_any_guest),
    ("hardware emulation", "pro", "no guest modification", emulation_unmodified),
    ("hardware emulation", "con", "slow: code interpreted, large emulation overhead", emulation_slow),
    ("full virtualization", "pro", "guests isolated and unmodified", fullvirt_unmodified),
    ("full virtualization", "pro", "faster than emulation", fullvirt_faster_than_emulation),
    ("full virtualization", "con", "every call trapped", fullvirt_trapped),
    ("full virtualization", "con", "guest must match the host's hardware", fullvirt_same_hardware),
    ("full virtualization", "con", "the hypervisor must provide every driver", fullvirt_every_driver),
    ("paravirtualization", "pro", "fast: little interaction with the hypervisor", paravirt_fast),
    ("paravirtualization", "pro", "efficient use of resources", paravirt_efficient),
    ("paravirtualization", "con", "the guest kernel must be modified", paravirt_modified),
    ("paravirtualization", "con", "limited guest OS support", paravirt_limited_os),
    ("containers", "pro", "fastest: no emulation or hypervisor", container_fastest),
    ("containers", "pro", "fast start-up, small footprint", container_startup),
    ("containers", "pro", "easy to scale and manage", container_scale),
    ("containers", "con", "not fully isolated: a host-kernel fault reaches every container", container_shared_kernel),
    ("containers", "con", "must match the host kernel", container_match_kernel),
    ("containers", "con", "weaker security than full virtualization", container_weaker_security),
]


def verdicts(result: dict[str, Any]) -> list[Verdict]:
    run = Run(result)
    return [Verdict(kind, side, claim, *judge(run)) for kind, side, claim, judge in ROWS]
