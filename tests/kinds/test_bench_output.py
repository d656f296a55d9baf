"""What the benchmarks print and draw: every number whole in an 80-column
terminal and in a pipe, one format per column, no target verdicts in the
demo, and a zero drawn as zero."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from pvbus.bench import blockbench, report
from pvbus.bench.tables import num

MODES = ("native", "paravirt", "fullvirt", "emulated")


def _records() -> list[dict[str, Any]]:
    """A run as the quick matrix records it, with the widest numbers seen."""
    out = []
    for rw, bs, qd in (("read", 1 << 20, 4), ("randwrite", 4096, 1), ("randread", 4096, 32)):
        for mode, iops, exits in (("native", 269_820.4, 0.0), ("paravirt", 131_577.2, 0.00041),
                                  ("fullvirt", 875.3, 7.0), ("emulated", 0.0211, 535_119.0)):
            out.append({"mode": mode, "rw": rw, "bs": bs, "iodepth": qd, "iops": iops, "mb_per_s": iops * bs / 1e6,
                        "lat_p50_us": None if mode == "emulated" else 15_141.37, "lat_p99_us": 2_210.9,
                        "exits_per_io": exits, "interrupts_per_io": 1.0, "seconds": 0.3})
    return out


RESULT = {"records": _records(), "targets": [
    {"target": "paravirt / emulated >= 50x, 1 MiB seq read", "ratio": 359_837.2, "met": True,
     "detail": "7,980 vs 0.0222 MB/s"},
    {"target": "rand 4 KiB read QD32 >= 0.5x native IOPS", "ratio": 0.488, "met": False,
     "detail": "131,577 vs 269,820 IOPS"},
]}


def _numbers(result: dict[str, Any]) -> list[str]:
    cells = [cell for row in blockbench.rows(result) for cell in row[2:] if cell]
    return cells + [num(t["ratio"]) for t in result["targets"]]


def _render(terminal: bool) -> str:
    buf = io.StringIO()
    blockbench.render(RESULT, "pvbus bench: one workload, four kinds of virtualization",
                      Console(file=buf, width=80, force_terminal=terminal, color_system=None))
    return buf.getvalue()


def test_an_80_column_terminal_shows_every_number_whole() -> None:
    text = _render(terminal=True)
    assert "…" not in text
    lines = text.splitlines()
    # a drawn table fits the width; one that could not fit came as Markdown
    assert all(len(line) <= 80 for line in lines if "┃" in line or "│" in line)
    for cell in _numbers(RESULT):
        assert any(re.search(rf"(?<![\d.,]){re.escape(cell)}(?![\d.,])", line) for line in lines), cell


def test_a_pipe_gets_markdown_with_every_number_whole() -> None:
    text = _render(terminal=False)
    assert "…" not in text and "┃" not in text  # plain Markdown, no box drawing
    assert "| mode" in text and "| target" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for cell in _numbers(RESULT):
        assert any(f" {cell} |" in row for row in rows), cell


def test_one_number_format_per_column() -> None:
    # three significant figures, integers in full with separators, never an exponent
    assert [num(v) for v in (269_820.4, 15_141.37, 875.3, 7.0, 2.5, 0.0211, 0.00041, 0.0)] == [
        "269,820", "15,141", "875", "7.00", "2.50", "0.0211", "0.000410", "0"]
    assert not any("e" in cell for row in blockbench.rows(RESULT) for cell in row[2:])


def test_the_demo_explains_and_gives_no_verdicts() -> None:
    buf = io.StringIO()
    blockbench.render_demo(RESULT, Console(file=buf, width=80, color_system=None))
    text = buf.getvalue()
    assert "targets" not in text.split("`make bench`")[0].lower()
    assert " NO " not in text and "| yes" not in text and "met" not in text.split()
    assert "share" in text and "move from run to run" in text and "make bench" in text


def test_a_zero_is_drawn_as_zero_never_as_a_floor() -> None:
    fig = report.bar_chart(RESULT, "exits_per_io", "Exits per I/O")
    ax = fig.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert sorted(heights) == sorted(r["exits_per_io"] for r in RESULT["records"])
    assert heights.count(0.0) == 3 and 1e-4 not in heights  # native's three workloads
    assert [t.get_text() for t in ax.texts].count("0") == 3  # and labelled, so it reads as zero, not missing
    assert ax.get_yscale() == "symlog"


def test_an_old_record_without_completed_io_is_never_a_number(tmp_path: Path) -> None:
    """Files written before the window waited for I/O hold records like the
    quick run's emulated randwrite: 0 I/Os at exits/IO = exits / 1e-9."""
    bad = {"mode": "emulated", "rw": "randwrite", "bs": 4096, "iodepth": 1, "ios": 0.0, "iops": 0.0,
           "mb_per_s": 0.0, "lat_p50_us": None, "lat_p99_us": None, "exits_per_io": 203_000_000_000.0,
           "interrupts_per_io": 0.0}
    result = {"records": [*RESULT["records"], bad]}
    md = report.markdown(result, [], "old.json")
    assert "| emulated | randwrite 4K qd1 | no I/O completed: not a measurement |" in md
    assert "203,000,000,000" not in md
    heights = [bar.get_height() for bar in report.bar_chart(result, "exits_per_io", "Exits").axes[0].patches]
    assert 203_000_000_000.0 not in heights and len(heights) == len(RESULT["records"])


def test_a_missing_record_draws_no_bar() -> None:
    partial = {"records": [r for r in RESULT["records"] if not (r["mode"] == "emulated" and r["rw"] == "read")]}
    fig = report.bar_chart(partial, "mb_per_s", "Throughput")
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert sorted(heights) == sorted(r["mb_per_s"] for r in partial["records"])
