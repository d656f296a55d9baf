"""The real program in a guest: its status, streams and signals relayed,
namespaces of its own, and an end when its host goes away.

Each test runs real ``pvbus host`` and ``pvbus guest --exec`` processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from .helpers import PVBUS, guest, guest_command, host, skip_unless_ready

DEADLINE = 15.0  # seconds: "ends within about a second", asserted generously


def test_status_output_and_input_are_the_programs(tmp_path: Path) -> None:
    skip_unless_ready()
    with host(tmp_path / "disk.img", "8M") as (_, sock):
        done = guest(sock, ["sh", "-c", 'read line; echo "out:$line"; echo err >&2; exit 42'], input=b"hello\n")
        killed = _killed_from_outside(sock)
        missing = guest(sock, ["no-such-program-here"])
    assert done.returncode == 42
    assert done.stdout == b"out:hello\n"
    assert b"err\n" in done.stderr
    assert killed == 128 + signal.SIGKILL
    assert missing.returncode == 1
    assert missing.stderr.decode().strip().splitlines()[-1].endswith("cannot run no-such-program-here: "
                                                                      "no such program in the guest")
    assert b"Traceback" not in missing.stderr


def _program_of(proc: subprocess.Popen[bytes], name: str) -> psutil.Process:
    """The guest's program (seen from the host), once it has started."""
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    deadline = time.monotonic() + DEADLINE  # the shell said so, then execs the program
    while True:
        found = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == name]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (program,) = found
    return program


def _killed_from_outside(sock: str) -> int:
    """The guest's status when its program is SIGKILLed."""
    proc = subprocess.Popen(guest_command(sock, ["sh", "-c", "echo started; exec sleep 600"]),
                            stdout=subprocess.PIPE)
    try:
        _program_of(proc, "sleep").kill()
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _mountinfo() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_hostname_and_mount_table_are_the_guests_own(tmp_path: Path) -> None:
    skip_unless_ready("mkfs.ext4")
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image), "16M"], check=True, capture_output=True)
    host_name, host_mounts = socket.gethostname(), _mountinfo()
    script = ('import json, os, socket, sys\n'
              'mounts = open("/proc/self/mountinfo").read().splitlines()\n'
              'print(json.dumps({"hostname": socket.gethostname(), "pid": os.getpid(),\n'
              '  "points": [line.split()[4] for line in mounts],\n'
              '  "files": sorted(os.listdir("/dev/pvbus"))}), flush=True)\n'
              'sys.stdin.readline()\n')
    with host(image) as (_, sock):
        proc = subprocess.Popen(guest_command(sock, ["python3", "-c", script], (f"disk0:{mnt}:ext4",)),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            seen = json.loads(proc.stdout.readline())
            during = _mountinfo()  # the host's, while the guest's mounts are up
            proc.stdin.write(b"done\n")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert seen["hostname"].startswith("pvbus-guest-") and seen["hostname"] != host_name
    assert seen["pid"] == 1  # the program is PID 1 of its own PID namespace
    assert "/dev/pvbus" in seen["points"] and str(mnt) in seen["points"]
    assert seen["files"] == ["disk0"]
    assert socket.gethostname() == host_name
    for table in (during, _mountinfo()):
        assert "/dev/pvbus" not in table and str(mnt) not in table
    assert _mountinfo() == host_mounts


def test_a_host_that_dies_ends_the_program_and_the_guest(tmp_path: Path) -> None:
    skip_unless_ready()
    with host(tmp_path / "disk.img", "8M") as (host_proc, sock):
        proc = subprocess.Popen(guest_command(sock, ["sh", "-c", "echo started; exec sleep 600"]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            program = _program_of(proc, "sleep")
            host_proc.kill()
            began = time.monotonic()
            status = proc.wait(timeout=60)
            took = time.monotonic() - began
            stderr = proc.stderr.read().decode() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert took < DEADLINE, f"the guest took {took:.1f} s to end"
    assert status == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "host went away" in lines[0], stderr
    assert not program.is_running() or program.status() == psutil.STATUS_ZOMBIE


def test_mount_and_exec_mistakes_are_one_line(tmp_path: Path) -> None:
    for argv, words in [(["--mount", "disk0:/mnt"], "--mount is for --exec"),
                        (["--exec", "--mount", "disk0:relative", "--", "true"], "must be an absolute path"),
                        (["--exec", "--mount", "nonsense", "--", "true"], "is not DISK:DIR[:TYPE]"),
                        (["--exec"], "--exec needs a command")]:
        done = subprocess.run([*PVBUS, "run", *argv], capture_output=True, timeout=60)
        assert done.returncode == 2, (argv, done.stderr)
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (argv, lines)


def test_a_missing_disk_to_mount_is_one_line(tmp_path: Path) -> None:
    skip_unless_ready()
    with host(tmp_path / "disk.img", "8M") as (_, sock):
        done = guest(sock, ["true"], (f"disk1:{tmp_path}",))
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot mount disk1: this guest has disk0" in lines[0], lines
    assert os.path.exists(tmp_path / "disk.img")


HANDLER = '''
import signal, sys

def stop(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    sys.exit(3)

signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
signal.pause()
'''


def test_a_signal_to_the_guest_reaches_the_program(tmp_path: Path) -> None:
    skip_unless_ready()
    with host(tmp_path / "disk.img", "8M") as (_, sock):
        proc = subprocess.Popen(guest_command(sock, ["python3", "-c", HANDLER]), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert out == b"got SIGTERM\n", err
    assert proc.returncode == 3
