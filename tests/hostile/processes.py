"""Host processes whose log the test reads, and clients run as another user.

``logged_host`` starts ``pvbus host`` with its stderr in a file (the tests
check what it logs: one line per refusal, no traceback); ``as_user`` runs a
small client with another uid and gids (we are root), which is how a test
shows what a peer of another user can and cannot do.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ..bus.harness import PVBUS, HostProcess

READY_TIMEOUT = 60
STOP_TIMEOUT = 30
OTHER_UID = 4242  # no such user: a peer that is neither the host's uid nor root


class LoggedHost(HostProcess):
    """A host subprocess with its log (stderr) in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: str, log_path: Path) -> None:
        super().__init__(proc, socket_path)
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the host and return its exit status (killing it past the deadline)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the host did not exit within {STOP_TIMEOUT} s of signal {sig}") from None


def start_host(socket_path: str | Path, log_path: Path, *args: str, env: dict[str, str] | None = None,
               log_level: str = "warning") -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen([*PVBUS, "--log-level", log_level, "host", "--socket", str(socket_path), *args],
                                stdout=subprocess.PIPE, stderr=log, env=env)


def wait_ready(proc: subprocess.Popen[bytes]) -> str:
    """The host's first stdout line ('' if it exited without one)."""
    assert proc.stdout is not None
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(READY_TIMEOUT):
            raise AssertionError(f"the host said nothing within {READY_TIMEOUT} s")
    return proc.stdout.readline().decode()


@contextmanager
def logged_host(directory: Path, *args: str, name: str = "host.sock", env: dict[str, str] | None = None,
                log_level: str = "warning") -> Iterator[LoggedHost]:
    """A ready ``pvbus host`` on ``directory/name``; stopped with SIGTERM at the end."""
    sock = directory / name
    log_path = directory / f"{name}.log"
    proc = start_host(sock, log_path, *args, env=env, log_level=log_level)
    try:
        line = wait_ready(proc)
        assert line.startswith("ready"), f"host did not start: {line!r}\n{log_path.read_text()}"
        yield LoggedHost(proc, str(sock), log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def eventually(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a generous deadline)."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pvbus-access-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def admin_exchange(path: str, payload: bytes, timeout: float = 30.0) -> bytes:
    """Send raw bytes to an admin socket and read until the host closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(f"{path}.admin")  # blocking: waits for room in the listen backlog
        s.settimeout(timeout)
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the host refused the rest of an oversized request: its answer is waiting
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def admin_answer(path: str, payload: bytes) -> dict[str, Any]:
    raw = admin_exchange(path, payload)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1, raw
    answer: dict[str, Any] = json.loads(raw)
    return answer


# Runs as another user, under the system interpreter (the venv's lives under
# /root, which other users cannot enter; this needs only the standard
# library).  It connects to a socket and prints one JSON line saying what
# happened.  "admin": send a line, read the answer.  "guest": the CONNECT
# exit a guest opens with (kind 1, u64 RAM size; a sealed RAM memfd and an
# eventfd), then read the host's status reply.
CLIENT = r"""
import fcntl, json, os, socket, struct, sys
path, kind, line = sys.argv[1], sys.argv[2], sys.argv[3].encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET if kind == "guest" else socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(path)
except OSError as exc:
    print(json.dumps({"connect": exc.errno}))
    sys.exit(0)
try:
    if kind == "guest":
        ram = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
        os.ftruncate(ram, 1 << 20)
        fcntl.fcntl(ram, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        socket.send_fds(s, [struct.pack("<IQ", 1, 1 << 20)], [ram, os.eventfd(0, os.EFD_NONBLOCK)])
        data = s.recv(512)
        print(json.dumps({"connect": 0, "status": struct.unpack("<I", data)[0] if len(data) == 4 else None}))
    else:
        s.sendall(line)
        print(json.dumps({"connect": 0, "answer": s.recv(65536).decode(errors="replace")}))
except OSError as exc:
    print(json.dumps({"connect": 0, "error": exc.errno}))
"""
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")


def as_user(uid: int, gid: int, path: str, kind: str = "admin", line: str = "",
            extra_groups: list[int] | None = None) -> dict[str, Any]:
    """Run ``CLIENT`` with the given credentials; what it saw."""
    if SYSTEM_PYTHON is None:
        pytest.skip("no system python3 for a client of another user")
    res = subprocess.run([SYSTEM_PYTHON, "-I", "-c", CLIENT, path, kind, line], user=uid, group=gid,
                         extra_groups=extra_groups or [], capture_output=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr.decode()
    seen: dict[str, Any] = json.loads(res.stdout)
    return seen
