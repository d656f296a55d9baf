"""A real file system over the disk's standard file: pyfatfs (FAT, from
PyPI) formats, writes and reads files on the paravirtual disk from a guest's
worker thread; on the host ``fsck.fat`` finds the file system clean and
pyfatfs, reading the image file directly, finds the same bytes."""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import trio

from ..bus.harness import host_process
from .helpers import run_guest

MiB = 1 << 20
DISK = 16 * MiB
FSCK = shutil.which("fsck.fat", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _pyfatfs() -> types.ModuleType:
    """``pyfatfs.PyFatFS``.  Its base, PyFilesystem2, declares its package a
    namespace with ``pkg_resources`` at import time, which setuptools 81
    removed (and the benchmark's hdrhistogram needs setuptools >= 83); a
    package with an ``__init__`` needs no such declaration, so an absent
    ``pkg_resources`` is given a ``declare_namespace`` that does nothing."""
    try:
        import pkg_resources  # type: ignore[import-not-found]  # noqa: F401
    except ModuleNotFoundError:
        shim = types.ModuleType("pkg_resources")
        shim.declare_namespace = lambda name: None  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("pyfatfs.PyFatFS")


def _files() -> dict[str, bytes]:
    rng = random.Random(11)
    return {
        "/README.TXT": b"paravirtual disk\n",
        "/docs/A file with a long name.bin": rng.randbytes(700_001),  # many clusters, an unaligned end
        "/docs/deep/er/small.dat": rng.randbytes(513),
        "/docs/deep/empty": b"",
    }


def _format_and_fill(disk: Any) -> dict[str, bytes]:
    """In a worker thread of the guest: format the disk, write the files,
    read them back through a fresh mount."""
    from pyfatfs.PyFat import PyFat

    fat = _pyfatfs()
    # pyfatfs formats a named file only (it truncates it to the size, which
    # no disk allows): format a scratch file of the disk's size and copy it
    # onto the disk, as an installer copies a file system image.
    with tempfile.TemporaryDirectory() as tmp:
        scratch = os.path.join(tmp, "fat.img")
        with open(scratch, "wb") as f:
            f.truncate(disk.capacity)
        mkfs = PyFat()
        mkfs.mkfs(scratch, PyFat.FAT_TYPE_FAT16, size=disk.capacity, label="PVBUS")
        mkfs.close()
        with open(scratch, "rb") as src, disk.open_sync() as dst:
            shutil.copyfileobj(src, dst, MiB)
    volume = fat.PyFatBytesIOFS(disk.open_sync())
    for path, data in _files().items():
        volume.makedirs(os.path.dirname(path), recreate=True)
        volume.writebytes(path, data)
    volume.close()  # marks the volume clean and closes the file: SYNCHRONIZE CACHE
    volume = fat.PyFatBytesIOFS(disk.open_sync())
    try:
        return {path: volume.readbytes(path) for path in _files()}
    finally:
        volume.close()


def _read_back(disk: Any) -> dict[str, bytes]:
    fat = _pyfatfs()
    f = disk.open_sync()
    assert not f.writable()  # a read-only disk gives a BufferedReader: pyfatfs mounts it read-only
    volume = fat.PyFatBytesIOFS(f)
    try:
        return {path: volume.readbytes(path) for path in _files()}
    finally:
        volume.close()


@pytest.mark.skipif(FSCK is None, reason="fsck.fat is missing (Debian package dosfstools; make install adds it)")
def test_fat_file_system_written_in_the_guest_is_clean_on_the_host(tmp_path: Path) -> None:
    image = tmp_path / "fat.img"
    with host_process(tmp_path, "--disk", str(image), "--disk-size", str(DISK)) as host:

        async def body(kernel: Any) -> dict[str, bytes]:
            disk = kernel.device("storage")
            with trio.fail_after(60):
                return await trio.to_thread.run_sync(functools.partial(_format_and_fill, disk))

        in_guest = run_guest(host.socket, body)
    expected = _files()
    assert {p: hashlib.sha256(d).hexdigest() for p, d in in_guest.items()} == \
        {p: hashlib.sha256(d).hexdigest() for p, d in expected.items()}

    assert FSCK is not None
    check = subprocess.run([FSCK, "-n", str(image)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "dirty" not in (check.stdout + check.stderr).lower()

    on_host = _pyfatfs().PyFatFS(str(image), read_only=True)
    try:
        assert {p: on_host.readbytes(p) for p in expected} == expected
        assert sorted(on_host.listdir("/docs/deep")) == ["empty", "er"]
    finally:
        on_host.close()
    assert image.stat().st_size == DISK

    # the same volume mounted again in a guest, on a read-only disk
    with host_process(tmp_path, "--disk", str(image), "--read-only") as host:

        async def read_only(kernel: Any) -> dict[str, bytes]:
            with trio.fail_after(60):
                return await trio.to_thread.run_sync(functools.partial(_read_back, kernel.device("storage")))

        assert run_guest(host.socket, read_only) == expected
