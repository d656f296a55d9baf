"""The fds a guest shares with the host cannot stall the host (issue 11,
findings 1-3).  Each attack runs in a guest process of its own while a good
guest echoes through the same host: the good guest must keep completing
echoes with the attack in place.  The deadline is generous for a loaded
machine; a host that blocks in the attacker's fd completes none until the
attack ends (never, or after the 30 s linger)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vmbus import hv

from ..bus.harness import HostProcess, guest_command, host_process
from .guests import Progress

ECHOES_DURING_ATTACK = 50
DEADLINE = 10.0  # seconds: far more than 50 echoes take on a loaded 2-core machine


@contextmanager
def attacker(host: HostProcess, kind: str) -> Iterator[dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.hostile.attackers", kind, host.socket],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lines: queue.Queue[bytes] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    def pump() -> None:
        for x in stdout:
            lines.put(x)

    threading.Thread(target=pump, daemon=True).start()
    try:
        facts = json.loads(lines.get(timeout=60))
        assert facts["ready"]
        yield facts
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def good_guest(host: HostProcess) -> Iterator[Progress]:
    proc = subprocess.Popen(guest_command(host, "tests.hostile.guests:echo_progress"), stdout=subprocess.PIPE)
    try:
        progress = Progress(proc, "echoes")
        progress.wait_started()
        yield progress
    finally:
        proc.kill()
        proc.wait()


def _other_guest_served_during(tmp_path: Path, kind: str) -> dict[str, Any]:
    with host_process(tmp_path) as host, good_guest(host) as good:
        with attacker(host, kind) as facts:
            assert good.advances_by(ECHOES_DURING_ATTACK, DEADLINE), (
                f"the good guest completed {ECHOES_DURING_ATTACK} echoes in {DEADLINE} s? no: "
                f"the host stalled while the {kind} attack was in place")
        # and after it, the host goes on serving
        assert good.advances_by(ECHOES_DURING_ATTACK, DEADLINE)
        assert host.admin({"cmd": "wait", "partitions": 1})["ok"]  # the attacker's partition was released
        return facts


def test_guest_clearing_o_nonblock_on_its_channel_eventfd(tmp_path: Path) -> None:
    facts = _other_guest_served_during(tmp_path, "blocking-doorbell")
    assert facts["blocking"] is True  # the attack took: the shared open file is blocking


def test_guest_with_a_full_blocking_sint_eventfd(tmp_path: Path) -> None:
    _other_guest_served_during(tmp_path, "full-sint")


def test_pipe_as_sint_is_refused(tmp_path: Path) -> None:
    facts = _other_guest_served_during(tmp_path, "pipe-sint")
    assert facts["status"] == hv.HvStatus.INVALID_PARAMETER


def test_lingering_socket_passed_as_an_extra_fd(tmp_path: Path) -> None:
    facts = _other_guest_served_during(tmp_path, "lingering-socket")
    assert facts["unsent"] > 0 and facts["connect"] == hv.HvStatus.SUCCESS
