"""How the benchmarks print their tables.

Every number is printed whole: a terminal too narrow for a table, or
output that is not a terminal at all (a pipe, a file, CI), gets the table
as plain Markdown instead of a boxed table that would cut cells down to
``15,141…``.  Numbers use one format everywhere (``num``): three
significant figures, integers in full with thousands separators, never an
exponent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def num(value: float | None, digits: int = 3) -> str:
    """``digits`` significant figures without an exponent: 15,141 / 2.50 /
    0.00412; blank for a missing value."""
    if value is None:
        return ""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> list[str]:
    """A GitHub-flavoured Markdown table, number columns right-aligned."""
    widths = [max([len(c), 3, *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w)
                                 for c, w, n in zip(cells, widths, numeric, strict=True)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if n else "-" * w for w, n in zip(widths, numeric, strict=True)) + " |"
    return [line(columns), rule, *(line(r) for r in rows)]


def _shows_everything(table: Any, width: int, rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> bool:
    """Whether ``table`` drawn ``width`` columns wide keeps every number whole
    on one line (rich shrinks columns to fit, folds words, and ellipsizes
    what still does not fit)."""
    import io

    from rich.console import Console

    drawn = io.StringIO()
    Console(file=drawn, width=width, color_system=None).print(table)
    lines = drawn.getvalue().splitlines()
    if "…" in "".join(lines) or any(len(line) > width for line in lines):
        return False
    # a number cell whole on one line; in text cells, each word (a label may
    # wrap between words, never inside one)
    pieces = [piece for row in rows for cell, is_num in zip(row, numeric, strict=True)
              for piece in ([cell] if is_num else cell.split()) if piece]
    return all(any(piece in line for line in lines) for piece in pieces)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool],
                console: Any = None) -> None:
    """A rich table on a terminal wide enough to show every number whole
    (text columns may wrap, number columns never do); Markdown otherwise."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_edge=False, pad_edge=False)  # two columns fewer to fit in
    for col, is_num in zip(columns, numeric, strict=True):
        if is_num:
            table.add_column(col, justify="right", no_wrap=True)
        else:
            table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    if console.is_terminal and _shows_everything(table, console.width, rows, numeric):
        console.print(table)
        return
    out = console.file
    print(f"\n{title}\n", file=out)
    print("\n".join(markdown(columns, rows, numeric)), file=out, flush=True)


def render_targets(console: Any, targets: list[dict[str, Any]]) -> None:
    """The targets table shared by every benchmark."""
    if not targets:
        return
    rows = [[t["target"], num(t["ratio"]), "yes" if t["met"] else "NO", t["detail"]] for t in targets]
    print_table("targets (ratios within this run)", ("target", "ratio", "met", "detail"), rows,
                (False, True, False, False), console)
