"""``pvbus bench`` end to end with a custom fio-like workload, then
``pvbus bench report``: JSON records with every field, a Markdown report
and real PNG charts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pvbus.bench.kinds import container_mode
from pvbus.bench.tables import num

from ..bus.harness import PVBUS

FIELDS = {"mode", "rw", "bs", "iodepth", "mb_per_s", "iops", "lat_p50_us", "lat_p90_us", "lat_p99_us",
          "lat_p999_us", "lat_max_us", "exits_per_io", "interrupts_per_io", "guest_cpu_s", "host_cpu_s"}


def test_bench_and_report(tmp_path: Path) -> None:
    out = tmp_path / "kinds.json"
    cmd = [*PVBUS, "bench", "--json", str(out), "--rw", "read", "--rw", "randread", "--bs", "4k",
           "--iodepth", "8", "--size", "8M", "--runtime", "0.2", "--ramp", "0"]
    res = subprocess.run(cmd, capture_output=True, timeout=240)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    result = json.loads(out.read_text())
    recs = result["records"]
    modes = ("native", container_mode(result), "paravirt", "fullvirt", "emulated")
    assert {(r["mode"], r["rw"]) for r in recs} == {(m, rw) for m in modes for rw in ("read", "randread")}
    for r in recs:
        assert FIELDS <= r.keys() and r["bs"] == 4096 and r["iodepth"] == 8 and r["ios"] > 0
    printed = res.stdout.decode()  # a pipe: the table as Markdown, every number whole
    assert "…" not in printed
    for r in recs:
        assert f" {num(r['iops'])} |" in printed and f" {num(r['exits_per_io'])} |" in printed
    by = {(r["mode"], r["rw"]): r for r in recs}
    exits = {mode: by[mode, "read"]["exits_per_io"] for mode in ("emulated", "fullvirt", "paravirt")}
    assert exits["emulated"] > exits["fullvirt"] > exits["paravirt"]
    assert by["native", "read"]["exits_per_io"] == 0
    res = subprocess.run([*PVBUS, "bench", "report", str(out)], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    report_dir = tmp_path / "kinds-report"
    md = (report_dir / "report.md").read_text()
    for mode in ("native", "paravirt", "fullvirt", "emulated"):
        assert f"| {mode} |" in md
    for png in ("throughput.png", "latency.png", "exits.png"):
        data = (report_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
