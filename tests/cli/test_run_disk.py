"""``pvbus run --disk``: the user's disk is never re-laid, resized or
written without ``--writable``.  Real processes (``python -m pvbus run``)
on real files and a real block device, checked by sha256 and size."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pvbus.bench.blockbench import lay_out

PVBUS = [sys.executable, "-m", "pvbus"]
MiB = 1 << 20
TIMEOUT = 180


def _digest(path: Path | str) -> tuple[str, int]:
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha256(data).hexdigest(), len(data)


def _user_disk(tmp_path: Path, size: int = 2 * MiB) -> Path:
    disk = tmp_path / "my.img"
    disk.write_bytes(os.urandom(size))
    return disk


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PVBUS, "run", *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, env=env)


def test_demo_on_an_existing_image_reads_it_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    disk = _user_disk(tmp_path)
    before = _digest(disk)
    res = _run("--disk", str(disk), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert _digest(disk) == before
    notes = [line for line in res.stderr.splitlines() if "read-only" in line]
    assert len(notes) == 1 and str(disk) in notes[0] and "--writable" in notes[0]
    assert "randread" in res.stdout and "write" not in res.stdout  # only the read workloads ran


def test_demo_refuses_to_resize_an_existing_image(tmp_path: Path) -> None:
    disk = _user_disk(tmp_path)
    before = _digest(disk)
    res = _run("--disk", str(disk), "--disk-size", "8M", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "never resized" in lines[0] and "Traceback" not in res.stderr
    assert _digest(disk) == before


def test_demo_on_a_missing_path_creates_and_keeps_it(tmp_path: Path) -> None:
    disk = tmp_path / "new.img"
    res = _run("--disk", str(disk), "--disk-size", "2M", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert disk.stat().st_size == 2 * MiB
    assert "created" in res.stderr and "randwrite" in res.stdout


WRITER = '''
import sys


async def main(kernel, argv):
    disk = kernel.device("storage")
    try:
        await disk.write(0, b"guest was here".ljust(512, b"."))
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 3
    return 0
'''


def test_a_program_writes_to_an_existing_image_only_with_writable(tmp_path: Path) -> None:
    (tmp_path / "writer.py").write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    disk = _user_disk(tmp_path)
    before = _digest(disk)
    res = _run("--program", "writer:main", "--disk", str(disk), cwd=tmp_path, env=env)
    assert res.returncode == 3, res.stderr
    assert "write-protected (read-only disk)" in res.stderr
    assert _digest(disk) == before

    res = _run("--program", "writer:main", "--disk", str(disk), "--writable", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    data = disk.read_bytes()
    assert data.startswith(b"guest was here...") and len(data) == before[1]


def test_host_disk_size_never_resizes_an_existing_image(tmp_path: Path) -> None:
    """``--disk-size`` creates a missing image; an existing one is served as it is."""
    from ..bus.harness import host_process

    disk = _user_disk(tmp_path, 1 * MiB)
    before = _digest(disk)
    with host_process(tmp_path, "--disk", str(disk), "--disk-size", "8M", "--read-only"):
        pass
    assert _digest(disk) == before


def test_lay_out_never_overwrites(tmp_path: Path) -> None:
    disk = _user_disk(tmp_path)
    before = _digest(disk)
    with pytest.raises(FileExistsError):
        lay_out(str(disk), 4 * MiB)
    assert _digest(disk) == before
    fresh = tmp_path / "fresh.img"
    lay_out(str(fresh), 3 * MiB)
    assert fresh.stat().st_size == 3 * MiB


@contextmanager
def _loop_device(backing: Path) -> Iterator[str]:
    losetup = shutil.which("losetup", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if os.geteuid() != 0 or losetup is None:
        pytest.skip("needs root and losetup for a loop block device")
    made = subprocess.run([losetup, "--find", "--show", str(backing)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "--detach", device], check=True)


def test_demo_on_a_block_device_leaves_it_as_it_was(tmp_path: Path) -> None:
    backing = _user_disk(tmp_path)
    with _loop_device(backing) as device:
        before = _digest(device)
        res = _run("--disk", device, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert _digest(device) == before
        assert "read-only" in res.stderr
    assert _digest(backing) == before
