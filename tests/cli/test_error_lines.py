"""Every fumble a user can make on the command line: one line on stderr that
names the problem (and the fix), exit status 2 for a usage error or 1 for a
failure, and never a traceback.  Each case runs ``python -m pvbus`` as a
user would, from a working directory holding the files the case needs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PVBUS = [sys.executable, "-m", "pvbus"]

PROGRAMS = '''
import missing_helper_module_xyz
'''

USER_PROGRAMS = '''
async def main(kernel, argv):
    raise ValueError("the program's own failure")


def not_async(kernel, argv):
    return 0


async def counts(kernel, argv):
    print("counted", len(argv))
    return 3
'''

# (name, argv, exit status, words the line must contain)
CASES = [
    # sockets: missing directory, missing file, a socket file nobody listens on
    ("host socket in a missing directory", ["host", "--socket", "/missing/dir/h.sock"], 1,
     ["/missing/dir/h.sock", "no directory /missing/dir"]),
    ("guest on a missing socket", ["guest", "--socket", "nonexistent.sock"], 1,
     ["no host socket at nonexistent.sock", "pvbus host --socket nonexistent.sock"]),
    ("host socket path too long", ["host", "--socket", "s" * 120], 2, ["is 120 bytes", "at most 107"]),
    ("guest socket path too long", ["guest", "--socket", "s" * 120], 1, ["is 120 bytes", "at most 107"]),
    ("guest on a stale socket", ["guest", "--socket", "stale.sock"], 1,
     ["no host is listening on stale.sock", "pvbus host --socket stale.sock"]),
    ("guest on a file that is not a socket", ["guest", "--socket", "empty.img"], 1,
     ["empty.img is not a socket", "pvbus host --socket"]),
    ("inspect on a missing socket", ["inspect", "--socket", "nonexistent.sock"], 1,
     ["no host socket at nonexistent.sock"]),
    ("inspect on a stale socket", ["inspect", "--socket", "stale.sock"], 1,
     ["no host is listening on stale.sock"]),
    # programs: checked before anything connects
    ("no such program module", ["guest", "--socket", "stale.sock", "--program", "nosuchmod:main"], 2,
     ["no module named 'nosuchmod'", "PYTHONPATH"]),
    ("no such program function", ["guest", "--socket", "stale.sock", "--program", "userprog:nosuchfunc"], 2,
     ["userprog has no 'nosuchfunc'", "main", "counts"]),
    ("a program that is not async", ["guest", "--socket", "stale.sock", "--program", "userprog:not_async"], 2,
     ["userprog:not_async is not an async function"]),
    ("a program whose module fails to import", ["guest", "--socket", "stale.sock", "--program", "brokenprog:main"],
     1, ["brokenprog failed to import", "missing_helper_module_xyz"]),
    ("not a program name", ["guest", "--socket", "stale.sock", "--program", "nosuchbuiltin"], 2,
     ["unknown program 'nosuchbuiltin'", "echo-demo"]),
    ("a program that raises", ["run", "--program", "userprog:main"], 1,
     ["program userprog:main failed", "ValueError", "the program's own failure"]),
    ("echo-demo given a word", ["run", "--program", "echo-demo", "--", "notanumber"], 2,
     ["echo-demo takes one argument", "notanumber"]),
    ("run with a device that needs a disk", ["run", "--program", "echo-demo", "--device", "storage"], 2,
     ["storage", "--disk"]),
    ("run with a device that does not exist", ["run", "--program", "echo-demo", "--device", "nosuchdevice"], 2,
     ["nosuchdevice", "echo"]),
    # numbers
    ("no guest RAM", ["guest", "--socket", "s", "--ram", "0"], 2, ["--ram", "minimum is 8 MiB"]),
    ("negative guest RAM", ["guest", "--socket", "s", "--ram", "-5"], 2, ["--ram", "minimum is 8 MiB"]),
    ("too little guest RAM", ["guest", "--socket", "s", "--ram", "1"], 2, ["--ram", "minimum is 8 MiB"]),
    ("more guest RAM than the machine", ["guest", "--socket", "s", "--ram", "1000000000"], 2,
     ["--ram", "more than this machine's"]),
    ("guest RAM not a number", ["run", "--program", "echo-demo", "--ram", "lots"], 2, ["--ram", "'lots'"]),
    ("a size with a bad unit", ["host", "--socket", "h.sock", "--disk", "d.img", "--disk-size", "1X"], 2,
     ["--disk-size", "'1X' is not a size", "128M"]),
    ("versions that are not versions", ["guest", "--socket", "s", "--versions", "abc"], 2,
     ["--versions", "'abc' is not a VMBus version", "5.3"]),
    ("a host version that does not exist", ["host", "--socket", "h.sock", "--versions", "9.9"], 2,
     ["--versions", "'9.9'"]),
    ("a queue depth of zero", ["bench", "--rw", "read", "--iodepth", "0"], 2, ["--iodepth", "at least 1"]),
    ("a ring demo of no packets", ["ring-demo", "--packets", "0"], 2, ["--packets", "at least 1"]),
    ("no command", [], 2, ["COMMAND"]),
    ("a log level that is none", ["--log-level", "loud", "inspect", "--socket", "s"], 2, ["--log-level", "loud"]),
    # disks, checked before the host says ready
    ("a disk that does not exist", ["host", "--socket", "h.sock", "--disk", "nosuch.img"], 1,
     ["disk nosuch.img does not exist", "--disk-size"]),
    ("a disk that is a directory", ["host", "--socket", "h.sock", "--disk", "adir"], 1,
     ["disk adir is a directory"]),
    ("an empty disk", ["host", "--socket", "h.sock", "--disk", "empty.img"], 1, ["disk empty.img is empty"]),
    ("a disk to create in a missing directory", ["host", "--socket", "h.sock", "--disk", "no/dir/new.img",
                                                  "--disk-size", "1M"], 1,
     ["cannot open disk no/dir/new.img", "No such file or directory"]),
    # anything unforeseen: one line, and where the traceback is
    ("an unforeseen error", ["bench", "report", "nosuch.json"], 1,
     ["pvbus: error: FileNotFoundError", "nosuch.json", "--debug"]),
]


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A working directory with a stale socket (bound, then its listener
    gone), user programs, a directory and an empty file."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin.bind(str(tmp_path / "stale.sock.admin"))
    admin.close()
    (tmp_path / "userprog.py").write_text(USER_PROGRAMS)
    (tmp_path / "brokenprog.py").write_text(PROGRAMS)
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.img").touch()
    yield tmp_path


def run_pvbus(args: list[str], cwd: Path, command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(command or PVBUS), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_one_line(res: subprocess.CompletedProcess[str], status: int, words: list[str]) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert res.returncode == status, (res.returncode, res.stderr)
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize(("args", "status", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_per_problem(workdir: Path, args: list[str], status: int, words: list[str]) -> None:
    res = run_pvbus(args, workdir)
    line = assert_one_line(res, status, words)
    if status == 2:
        assert ": error: " in line  # argparse's form for usage errors
    assert "went away" not in line  # no host ever was: never say it left


def test_nothing_is_created_by_a_refused_host(workdir: Path) -> None:
    """A host refused before ``ready`` leaves no socket and no image behind."""
    res = run_pvbus(["host", "--socket", "h.sock", "--disk", "nosuch.img"], workdir)
    assert res.returncode == 1
    assert not (workdir / "h.sock").exists() and not (workdir / "nosuch.img").exists()


def test_debug_shows_the_traceback(workdir: Path) -> None:
    res = run_pvbus(["--debug", "bench", "report", "nosuch.json"], workdir)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "FileNotFoundError" in res.stderr


def test_debug_shows_where_a_program_failed(workdir: Path) -> None:
    res = run_pvbus(["--debug", "run", "--program", "userprog:main"], workdir)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and 'raise ValueError("the program\'s own failure")' in res.stderr


def test_a_program_that_returns_a_status(workdir: Path) -> None:
    """The counterpart of the failures: a user program from the working
    directory runs and its status is the command's."""
    res = run_pvbus(["run", "--program", "userprog:counts", "--", "a", "b"], workdir)
    assert res.returncode == 3, res.stderr
    assert res.stdout.splitlines() == ["counted 2"]


def test_console_script_imports_programs_from_the_working_directory(workdir: Path) -> None:
    """``pvbus guest`` (the installed script, which does not put the working
    directory on the path as ``python -m`` does) finds ``userprog`` too: it
    gets as far as connecting."""
    script = shutil.which("pvbus", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the pvbus console script is not installed beside this Python")
    res = run_pvbus(["guest", "--socket", "stale.sock", "--program", "userprog:counts"], workdir, [script])
    assert_one_line(res, 1, ["no host is listening on stale.sock"])


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``path`` made unwritable even for root (chattr +i), or skip."""
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a file unwritable here (no chattr +i)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def test_an_unwritable_disk(workdir: Path) -> None:
    disk = workdir / "locked.img"
    disk.write_bytes(bytes(1 << 20))
    if os.geteuid() != 0:
        disk.chmod(0o444)
        res = run_pvbus(["host", "--socket", "h.sock", "--disk", "locked.img"], workdir)
    else:
        with immutable(disk):
            res = run_pvbus(["host", "--socket", "h.sock", "--disk", "locked.img"], workdir)
    assert_one_line(res, 1, ["cannot open disk locked.img"])
    assert not (workdir / "h.sock").exists()


def test_a_version_the_host_refuses(workdir: Path) -> None:
    """A host that accepts only 5.3 and a guest offering 5.2 and 5.1: the
    guest says which versions it offered and what to do, in one line."""
    host = subprocess.Popen([*PVBUS, "host", "--socket", "h.sock", "--versions", "5.3"], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None and host.stdout.readline().startswith("ready")
        res = run_pvbus(["guest", "--socket", "h.sock", "--versions", "5.2,5.1"], workdir)
    finally:
        host.terminate()
        host.communicate(timeout=60)
    assert_one_line(res, 1, ["none of our VMBus versions", "5.2, 5.1", "--versions"])


def test_a_host_that_stops_before_ready_is_one_line_in_run(workdir: Path) -> None:
    """``pvbus run`` whose host refuses its disk: the host's line, nothing more."""
    res = run_pvbus(["run", "--program", "echo-demo", "--device", "storage", "--disk", "adir"], workdir)
    assert_one_line(res, 1, ["disk adir is a directory"])


def test_a_program_asking_for_a_device_the_host_does_not_offer(workdir: Path) -> None:
    """echo-demo against a host offering only its disk: the line says which
    device is missing and which are there."""
    res = run_pvbus(["run", "--program", "echo-demo", "--device", "storage", "--disk", "d.img",
                     "--disk-size", "4M"], workdir)
    assert_one_line(res, 1, ["program echo-demo failed", "no device 'echo'", "open: storage"])


def test_guest_ram_too_small_for_the_offered_rings(workdir: Path) -> None:
    """A device whose rings alone take more than the guest's 8 MiB: the guest
    says its RAM is not enough for the host's devices and how to give more."""
    from ..bus.harness import SINK_MODULE, env_with, install_plugin

    site = install_plugin(workdir, "bigring", SINK_MODULE.replace("ring_pages=2", "ring_pages=1500"))
    env = env_with(site)
    host = subprocess.Popen([*PVBUS, "host", "--socket", "h.sock", "--device", "sink"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None and host.stdout.readline().startswith("ready")
        res = subprocess.run([*PVBUS, "guest", "--socket", "h.sock", "--ram", "8", "--program", "idle"],
                             cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    finally:
        host.terminate()
        host.communicate(timeout=60)
    assert_one_line(res, 1, ["8 MiB of guest RAM is not enough for the host's devices", "--ram"])
