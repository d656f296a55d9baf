"""The ring package's lazy exports (``ring/__init__.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ring

INIT = Path(ring.__file__)


def test_type_checkers_see_exactly_the_exported_names() -> None:
    tree = ast.parse(INIT.read_text())
    checked = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {alias.asname or alias.name: (f".{imp.module}", alias.name)
            for imp in checked.body if isinstance(imp, ast.ImportFrom) for alias in imp.names}
    assert seen == ring._EXPORTS
    for name in ring.__all__:
        assert getattr(ring, name) is not None


def test_the_build_helper_imports_without_the_c_core_or_trio() -> None:
    """What a package build needs: ``ring.build`` before ``ring._ring_c``
    exists and without the runtime dependencies installed."""
    code = ("import sys; sys.modules['trio'] = None; sys.modules['ring._ring_c'] = None\n"
            "import ring.build\n"
            "assert callable(ring.build.device_module)\n"
            "try:\n    ring.OutgoingRing\nexcept ImportError:\n    print('lazy')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "lazy"


def test_an_unknown_name_is_an_attribute_error() -> None:
    assert not hasattr(ring, "NoSuchThing")
