"""``pvbus bench report RESULTS.json``: Markdown and PNG charts from a run.

Charts (matplotlib, Agg backend, so it runs headless): throughput per mode
and workload, latency percentiles per mode, exits per I/O on a log scale.
With ``--kinds-doc FILE`` it also writes the four-kinds document
(``kinds_doc``, verdicts from ``verdicts.py``): each pro and con of the
kinds beside the figure of this run that backs it or not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .tables import num

MODES = ("native", "container", "container (plain process)", "paravirt", "fullvirt", "emulated")
COLORS = {"native": "#4c72b0", "container": "#8172b3", "container (plain process)": "#937860",
          "paravirt": "#55a868", "fullvirt": "#dd8452", "emulated": "#c44e52"}


def _label(r: dict[str, Any]) -> str:
    from .blockbench import size_label

    return f"{r['rw']} {size_label(r['bs'])} qd{r['iodepth']}"


def _measured(r: dict[str, Any]) -> bool:
    return bool(r.get("ios", 1))


def _grouped(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, dict[str, Any]]]]:
    """Workload labels in order, and each mode's records by label; a record
    without completed I/O is left out (no bar rather than a false one)."""
    labels: list[str] = []
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in filter(_measured, records):
        lab = _label(r)
        if lab not in labels:
            labels.append(lab)
        by.setdefault(r["mode"], {})[lab] = r
    return labels, by


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(result: dict[str, Any], metric: str, title: str) -> Any:
    """Bars of ``metric`` per workload and mode, on a symmetric log scale:
    linear below the smallest positive value, so a true zero (native exits)
    is drawn as zero and labelled "0", never lifted to a made-up floor.  A
    mode without a record for a workload gets no bar."""
    plt = _pyplot()
    labels, by = _grouped(result["records"])
    modes = [m for m in MODES if m in by]
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    positive = [r[metric] for r in result["records"] if r.get(metric) and _measured(r)]
    for i, mode in enumerate(modes):
        xs = [x + i * width for x, lab in enumerate(labels) if lab in by[mode]]
        vals = [by[mode][lab].get(metric) or 0.0 for lab in labels if lab in by[mode]]
        ax.bar(xs, vals, width, label=mode, color=COLORS[mode])
        for x, v in zip(xs, vals, strict=True):
            if v == 0:
                ax.annotate("0", (x, 0), ha="center", va="bottom", fontsize=8)
    absent = [m for m in MODES if m not in by and m != "container (plain process)"]
    if absent:  # every kind present or said to be missing
        ax.annotate("absent from this run: " + ", ".join(absent), (0.01, 0.97), xycoords="axes fraction",
                    va="top", fontsize=8)
    ax.set_yscale("symlog", linthresh=min(positive, default=1.0))
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(labels))], labels, rotation=15)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    labels, by = _grouped(result["records"])
    modes = [m for m in MODES if m in by]
    files = []
    for metric, title, fname in (
        ("mb_per_s", "Throughput (MB/s, log scale)", "throughput.png"),
        ("exits_per_io", "Exits per I/O (log scale; 0 drawn as 0)", "exits.png"),
    ):
        fig = bar_chart(result, metric, title)
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(out / fname)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    pcts = ("lat_p50_us", "lat_p90_us", "lat_p99_us", "lat_p999_us")
    target = next((lab for lab in labels if lab.startswith("randread 4K qd32")), labels[0])
    for mode in modes:
        rec = by[mode].get(target)
        if rec and rec.get("lat_p50_us") is not None:
            ax.plot(["p50", "p90", "p99", "p99.9"], [rec[p] for p in pcts], marker="o", label=mode, color=COLORS[mode])
    ax.set_yscale("log")
    ax.set_ylabel("microseconds")
    ax.set_title(f"Latency percentiles, {target}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    files.append(out / "latency.png")
    return files


def markdown(result: dict[str, Any], images: list[Path], source: str) -> str:
    lines = ["# pvbus benchmark report", "", f"Source: `{source}`. Machine: "
             + ", ".join(f"{k} {v}" for k, v in result.get("machine", {}).items()), ""]
    lines += ["| mode | workload | IOPS | MB/s | p50 us | p99 us | p99.9 us | exits/IO | interrupts/IO |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["records"]:
        if not _measured(r):  # a file from before records had to rest on completed I/O
            lines.append(f"| {r['mode']} | {_label(r)} | no I/O completed: not a measurement | | | | | | |")
            continue
        cells = [r["iops"], r["mb_per_s"], r.get("lat_p50_us"), r.get("lat_p99_us"), r.get("lat_p999_us"),
                 r["exits_per_io"], r.get("interrupts_per_io")]
        lines.append(f"| {r['mode']} | {_label(r)} | " + " | ".join(num(v) for v in cells) + " |")
    if result.get("targets"):
        lines += ["", "| target | ratio | met |", "| --- | ---: | --- |"]
        lines += [f"| {t['target']} | {num(t['ratio'])} ({t['detail']}) | {'yes' if t['met'] else 'no'} |"
                  for t in result["targets"]]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    return "\n".join(lines)


def kinds_doc(result: dict[str, Any], command: str) -> str:
    """The seed's pros and cons of each kind, each beside this run's figure
    and a verdict computed from it; the mechanisms, the container's view of
    itself, start-up and density, and the ordering checks."""
    from .verdicts import verdicts

    m = result.get("machine", {})
    note = (f"A quick run (short measurements, density capped lower) on a shared {m.get('cpus')}-core machine: "
            "read the figures as magnitudes." if "--quick" in command else "")
    lines = ["# The kinds of virtualization, measured", "",
             f"Generated by `pvbus bench report` from one run of `{command}` on {m.get('cpus')} CPUs "
             f"({m.get('cpu')}), Python {m.get('python')}. {note}".rstrip(),
             "The same disk image and offsets for every kind; every verdict below is computed from this run's "
             "figures, so another run may turn one.", "",
             "## What ran", "", "| mode | mechanism | fallback |", "| --- | --- | --- |"]
    lines += [f"| {mode} | {info['mechanism']} | {info.get('fallback') or 'none: the real mechanism'} |"
              for mode, info in result.get("kinds", {}).items()]
    absent = [mode for mode in MODES if mode not in result.get("kinds", {}) and mode != "container (plain process)"]
    if absent:
        lines += ["", f"Absent from this run: {', '.join(absent)}."]
    box = result.get("kinds", {}).get("container")
    if box and box.get("inside"):
        inside, host, lim, use = box["inside"], box["host"], box["inside"]["cgroup_limits"] or {}, box["cgroup_usage"]
        lines += ["", "## The container, seen from inside", "",
                  f"- kernel: `{inside['kernel']}` inside, `{host['kernel']}` on the host; 0 exits: its I/O is the "
                  "host kernel's system call",
                  f"- PID {inside['pid']}, processes visible {inside['processes']}; host name `{inside['hostname']}` "
                  f"(host: `{host['hostname']}`); network interfaces {inside['net_interfaces']}",
                  f"- namespaces of its own: {', '.join(box['own_namespaces'])}",
                  "- its mounts: " + "; ".join(f"`{x}`" for x in inside["mounts"]),
                  f"- cgroup v{inside['cgroup_version']}, limits read from inside: "
                  + ", ".join(f"{k} {v}" for k, v in lim.items() if k not in ("cpus", "memory_bytes")),
                  f"- usage for the whole run ({use['source']}): peak memory {num(use['memory_peak_bytes'] / 2**20)} "
                  f"MiB, CPU {num(use['cpu_s'])} s"]
    st = result.get("startup")
    if st:
        lines += ["", "## Start-up and density", "",
                  "Start-up: launch to the first completed 4 KiB read (its SHA-256 checked against the image). "
                  "Memory: PSS of all the instance's processes (`/proc/PID/smaps_rollup`). Density: instances "
                  "launched back to back and left running, counted when up within the window, capped.", "",
                  "| kind | start-up ms | PSS MiB alone | PSS MiB side by side | up within window | stopped by |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {k} | {num(s['startup_s'] * 1000)} | {num(s['pss_alone_bytes'] / 2**20)} | "
                  f"{num((s['pss_per_instance_bytes'] or 0) / 2**20)} | {s['instances_up']} in {num(s['window_s'])} s "
                  f"(cap {s['cap']}) | {s['stopped_by']} |" for k, s in st.items()]
    if result.get("targets"):
        lines += ["", "## Checks computed in the run", "", "| check | met | figures |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {'yes' if t['met'] else 'no'} | {t['detail']} |" for t in result["targets"]]
    lines += ["", "## The seed's pros and cons", "", "| kind | | claim | this run's figure | verdict |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {v.kind} | {v.side} | {v.claim} | {v.figure} | {v.verdict} |" for v in verdicts(result)]
    lines += ["", "## Records", "", "| mode | workload | IOPS | MB/s | p50 us | p99 us | exits/IO |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['mode']} | {_label(r)} | {num(r['iops'])} | {num(r['mb_per_s'])} | {num(r.get('lat_p50_us'))} | "
              f"{num(r.get('lat_p99_us'))} | {num(r['exits_per_io'])} |" for r in result["records"] if _measured(r)]
    lines += ["", f"Reproduce: `{command} --json FILE`, then `pvbus bench report FILE --kinds-doc "
              "docs/virtualization-kinds.md`.", ""]
    return "\n".join(lines)


def main(path: str, kinds_doc_path: str | None) -> int:
    src = Path(path)
    result = json.loads(src.read_text())
    out = src.with_suffix("")
    out = out.parent / f"{out.name}-report"
    out.mkdir(parents=True, exist_ok=True)
    images = charts(result, out)
    (out / "report.md").write_text(markdown(result, images, src.name))
    print(f"wrote {out / 'report.md'} and {len(images)} charts")
    if kinds_doc_path:
        Path(kinds_doc_path).write_text(kinds_doc(result, result.get("command", "make bench")))
        print(f"wrote {kinds_doc_path}")
    return 0
