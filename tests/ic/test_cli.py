"""``pvbus kvp`` and ``pvbus shutdown`` against a real host and guest, and
the integration services configured from the command line."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.bus.harness import PVBUS, guest_command, host_process


def pvbus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PVBUS, *args], capture_output=True, text=True, timeout=60)


def answer(*args: str) -> dict[str, Any]:
    res = pvbus(*args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def eventually(check: Any, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_kvp_and_shutdown_from_the_command_line(tmp_path: Path) -> None:
    with host_process(tmp_path, "--device", "kvp:refresh=0.2", "--device", "shutdown",
                      "--device", "heartbeat:interval=0.2") as host:
        guest = subprocess.Popen(guest_command(host, "idle"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert guest.stdout is not None
            assert json.loads(guest.stdout.readline())["booted"] is True
            sock = host.socket
            # The guest published its host name into its pool at start.
            listed = eventually(lambda: answer("kvp", "--socket", sock, "1", "list")["items"])
            assert listed.get("FullyQualifiedDomainName"), listed
            assert answer("kvp", "--socket", sock, "1", "set", "role", "web")["key"] == "role"
            got = answer("kvp", "--socket", sock, "--pool", "external", "1", "get", "role")
            assert got == {"key": "role", "value": "web"}
            missing = pvbus("kvp", "--socket", sock, "1", "get", "no-such-key")
            assert missing.returncode == 1 and "no key 'no-such-key'" in missing.stderr
            assert len(missing.stderr.strip().splitlines()) == 1
            nobody = pvbus("kvp", "--socket", sock, "7", "list")
            assert nobody.returncode == 1 and "no partition 7" in nobody.stderr
            # Configured from the command line: beats every 0.2 s.
            beats = eventually(lambda: next(
                ch["device_state"]["beats_answered"] for ch in host.inspect()["partitions"][0]["channels"]
                if ch["device"] == "heartbeat") >= 5)
            assert beats
            assert pvbus("shutdown", "--socket", sock, "1").returncode == 0
            assert guest.wait(timeout=30) == 0  # the program was cancelled and the guest shut down cleanly
        finally:
            if guest.poll() is None:
                guest.kill()
                guest.wait()
