"""docs/writing-a-driver.md, step by step: write the files it shows, install
them as a separate package (pip --target, not into the project's venv),
and run its guest program through ``pvbus run``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-driver.md"
BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```", re.S | re.M)


def test_writing_a_driver_walkthrough(tmp_path: Path) -> None:
    blocks = BLOCK.findall(DOC.read_text())
    names = [name for name, _ in blocks]
    assert names == [
        "pvbus_entropy/protocol.py", "pvbus_entropy/host.py", "pvbus_entropy/guest.py",
        "pvbus_entropy/__init__.py", "pyproject.toml", "pvbus_entropy/demo.py", "tests/test_entropy.py",
    ]
    src = tmp_path / "pvbus-entropy"
    for name, text in blocks:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(src)],
        check=True, timeout=180,
    )
    assert list(site.glob("pvbus_entropy-*.dist-info"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    unit = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(src / "tests" / "test_entropy.py")],
        capture_output=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert unit.returncode == 0, unit.stdout.decode()[-3000:]
    assert "1 passed" in unit.stdout.decode()
    res = subprocess.run(
        [sys.executable, "-m", "pvbus", "run", "--ram", "32", "--program", "pvbus_entropy.demo:main"],
        capture_output=True, timeout=120, env=env,
    )
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    report = json.loads(res.stdout.decode().strip().splitlines()[-1])
    assert report == {"chunks": 10, "distinct": 10, "bytes": 640}
