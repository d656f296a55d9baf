"""Who may import whom (shared/docs architecture, "Layers"): checked on the
source, so a new import across a boundary fails here, not in review.

- ``ring`` imports nothing of the project;
- ``vmbus`` (the bus, both sides) imports only ``ring``: it knows no device;
- ``guest_kernel`` and ``host_drivers`` import ``ring`` and ``vmbus``, never
  each other (the host never loads guest code, nor the other way round);
- ``pvbus`` (the CLI and benchmarks) may import everything;
- no package imports another package's underscored module or name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ring", "vmbus", "guest_kernel", "host_drivers", "pvbus")
MAY_IMPORT = {
    "ring": set(),
    "vmbus": {"ring"},
    "guest_kernel": {"ring", "vmbus"},
    "host_drivers": {"ring", "vmbus"},
    "pvbus": set(PACKAGES),
}


def imports_of(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) for every absolute import."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
    return found


def violations() -> list[str]:
    bad: list[str] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT)
            for line, module, name in imports_of(path):
                top, *rest = module.split(".")
                if top not in PACKAGES or top == package:
                    continue
                if top not in MAY_IMPORT[package]:
                    bad.append(f"{where}:{line}: {package} must not import {module}")
                parts = rest + ([name] if name else [])
                private = [p for p in parts if p.startswith("_") and not p.startswith("__")]
                if private:
                    bad.append(f"{where}:{line}: {module} {name or ''}: another package's private {private[0]}")
    return bad


def test_no_import_crosses_a_layer_or_reaches_a_private_name() -> None:
    assert violations() == []


def test_the_checker_sees_a_crossing(tmp_path: Path) -> None:
    """The check itself: a planted bad import is reported."""
    planted = tmp_path / "bad.py"
    planted.write_text("from host_drivers.storage import backend\nfrom ring._layout import pad8\n")
    found = [(m, n) for _, m, n in imports_of(planted)]
    assert found == [("host_drivers.storage", "backend"), ("ring._layout", "pad8")]
