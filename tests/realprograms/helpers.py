"""Real programs in real guests: a host on an image, guests run with --exec.

``requirements`` says what the machine lacks for these tests (root,
namespaces, FUSE, loop devices, a tool), so each test skips naming it.
``host`` starts a ``pvbus host`` on an image (killed after); ``guest``
runs ``pvbus guest --exec`` against it.  ``tree_of`` reads a directory
into {relative path: bytes}; ``image_tree`` reads a file system image the
guest wrote, mounted read-only through a loop device in a mount namespace
of the test's own (the host's mount table is never touched).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PVBUS = [sys.executable, "-m", "pvbus"]
GUEST_TIMEOUT = 60.0  # seconds for a guest run (generous: a loaded 2-core machine)


def _namespaces_allowed() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def requirements(*tools: str) -> str | None:
    """What is missing to run a guest with disks as files (and ``tools``), or None."""
    from guest_kernel.namespaces import loop_devices_available
    from guest_kernel.presenters.fuse_disk import fuse_available

    if os.geteuid() != 0:
        return "needs root (namespaces, FUSE mounts, loop devices)"
    if (missing := fuse_available()) is not None:
        return missing
    if (missing := loop_devices_available()) is not None:
        return missing
    for tool in ("unshare", "losetup", "mount", *tools):
        if shutil.which(tool) is None and not any(os.access(f"{d}/{tool}", os.X_OK) for d in ("/sbin", "/usr/sbin")):
            return f"{tool} is not installed"
    if not _namespaces_allowed():
        return "mount and UTS namespaces are not allowed here"
    return None


def skip_unless_ready(*tools: str) -> None:
    if (missing := requirements(*tools)) is not None:
        pytest.skip(missing)


def tool(name: str) -> str:
    found = shutil.which(name)
    return found or next(f"{d}/{name}" for d in ("/sbin", "/usr/sbin") if os.access(f"{d}/{name}", os.X_OK))


@contextmanager
def host(image: Path, size: str | None = None, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A ``pvbus host`` with ``image`` as its disk (made at ``size`` if
    given); yields it and its socket; whatever is left of it is killed after."""
    with tempfile.TemporaryDirectory(prefix="pvbus-rp-") as tmp:
        sock = os.path.join(tmp, "host.sock")
        cmd = [*PVBUS, "host", "--socket", sock, "--disk", str(image), *(["--disk-size", size] if size else []),
               "--device", "storage", *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
            yield proc, sock
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def guest_command(sock: str, argv: list[str], mounts: tuple[str, ...] = ()) -> list[str]:
    return [*PVBUS, "guest", "--socket", sock, "--ram", "64", "--exec",
            *(f"--mount={m}" for m in mounts), "--", *argv]


def guest(sock: str, argv: list[str], mounts: tuple[str, ...] = (), *, input: bytes = b"",
          cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` in a guest of the host on ``sock``; its result."""
    return subprocess.run(guest_command(sock, argv, mounts), input=input, capture_output=True,
                          timeout=GUEST_TIMEOUT, cwd=cwd)


def run_ok(sock: str, script: str, mounts: tuple[str, ...] = ()) -> str:
    """Run a shell script in a guest; fail the test (with its output) unless it exits 0."""
    done = guest(sock, ["sh", "-ec", script], mounts)
    assert done.returncode == 0, f"guest exited {done.returncode}: {done.stdout.decode()} {done.stderr.decode()}"
    return done.stdout.decode()


def make_tree(root: Path, seed: int = 1) -> dict[str, bytes]:
    """A small tree of files of awkward sizes (empty, odd, unaligned,
    several MiB), nested; returns what it wrote."""
    import random

    rng = random.Random(seed)
    sizes = [0, 1, 511, 512, 4095, 4097, 65_537, 300_001, 3 << 20 | 123]
    files = {}
    for i, size in enumerate(sizes):
        rel = f"d{i % 3}/sub{i % 2}/file{i}.bin"
        files[rel] = rng.randbytes(size)
    files["top.txt"] = b"a file tree written by real programs in a guest\n"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def tree_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def image_tree(image: Path, fstype: str, out: Path) -> dict[str, bytes]:
    """The files in a file system image: mounted read-only through a loop
    device in a mount namespace of its own, copied out to ``out``."""
    out.mkdir()
    with tempfile.TemporaryDirectory(prefix="pvbus-rp-mnt-") as mnt:
        script = f'mount -o ro,loop -t {fstype} "$1" "$2" && cp -a "$2/." "$3/"'
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                               str(image), mnt, str(out)], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
    tree = tree_of(out)
    tree.pop("lost+found", None)
    return tree
