"""The kinds document's verdicts come from the run's numbers: the same
claim is backed by one record set and not by another."""

from __future__ import annotations

from typing import Any

from pvbus.bench import report
from pvbus.bench.verdicts import BACKED, NOT_BACKED, verdicts


def _result(container_mb_s: float) -> dict[str, Any]:
    records = []
    for mode, mb_s, iops, exits in (("native", 7000.0, 150_000.0, 0.0), ("container", container_mb_s, 140_000.0, 0.0),
                                    ("paravirt", 5000.0, 9_000.0, 0.05), ("fullvirt", 600.0, 200.0, 7.0),
                                    ("emulated", 0.006, 0.7, 2000.0)):
        for rw, bs, rate in (("read", 1 << 20, mb_s), ("randread", 4096, iops)):
            per_s = rate * 1e6 / bs if bs >= 1 << 20 else rate
            records.append({"mode": mode, "rw": rw, "bs": bs, "iodepth": 4, "ios": per_s, "iops": per_s,
                            "mb_per_s": per_s * bs / 1e6, "exits_per_io": exits, "interrupts_per_io": 0.0,
                            "lat_p50_us": 1.0, "lat_p99_us": 2.0, "guest_cpu_s": 0.1, "host_cpu_s": 0.1})
    return {"records": records, "kinds": {"container": {"mechanism": "namespaces", "fallback": None}}}


def _fastest(result: dict[str, Any]) -> str:
    return next(v.verdict for v in verdicts(result) if v.claim.startswith("fastest"))


def test_paravirtual_beating_the_container_is_not_backed() -> None:
    verdict = _fastest(_result(container_mb_s=4000.0))
    assert verdict.startswith(NOT_BACKED) and "paravirt at read 1M qd4" in verdict


def test_a_container_ahead_everywhere_is_backed() -> None:
    assert _fastest(_result(container_mb_s=6500.0)) == BACKED


def test_every_seed_row_has_a_verdict_in_the_document() -> None:
    result = _result(4000.0)
    result["machine"] = {"cpus": 2}
    doc = report.kinds_doc(result, "pvbus bench --quick")
    assert len(verdicts(result)) == 18 and "quick run" in doc
    assert "| containers | pro | fastest: no emulation or hypervisor | container vs paravirt, read 1M qd4: " \
           "4,000 vs 5,000 MB/s" in doc


def test_the_container_zero_exits_are_drawn_as_zero() -> None:
    fig = report.bar_chart(_result(4000.0), "exits_per_io", "Exits")
    heights = sorted(bar.get_height() for bar in fig.axes[0].patches)
    assert heights[:4] == [0.0] * 4  # native and container, two workloads each: zero, never a floor
    assert fig.axes[0].get_yscale() == "symlog"
