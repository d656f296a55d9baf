"""What the host's log says when a partition goes wrong: one warning line
naming the partition and the reason, no traceback (that only at debug
level), and the host goes on serving other guests.

Two failures a device plugin can cause, with real processes: a device whose
worker raises on the guest's open channel (the channel is rescinded), and a
device that cannot even be set up for a partition (the partition is
released)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ..bus.harness import env_with, guest_command, install_plugin, run_guest
from .processes import eventually, logged_host

FAILING_DEVICE = '''
"""A device whose host half fails: in its worker, or when it is made."""
import os
import uuid
from vmbus.device import DeviceSpec, GuestDriver, HostDevice

class FailingHost(HostDevice):
    def __init__(self, config):
        super().__init__(config)
        if os.environ.get("FAIL_WHEN") == "made":
            raise RuntimeError("cannot set up the failing device")
    async def serve(self, channel, memory):
        raise ValueError("the failing device tripped over a packet")

SPEC = DeviceSpec("failing", uuid.UUID("6a0c6b1e-3d4e-4b9a-9f67-0a5c1d2e3f40"), FailingHost, GuestDriver,
                  ring_pages=2)
'''


def _warnings(log: str, pattern: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(pattern, line)]


@pytest.mark.parametrize("level", ["warning", "debug"])
def test_a_failing_device_worker_is_one_line(tmp_path: Path, level: str) -> None:
    env = env_with(install_plugin(tmp_path, "failing", FAILING_DEVICE))
    with logged_host(tmp_path, "--device", "echo", "--device", "failing", env=env, log_level=level) as host:
        # The failing channel is rescinded as soon as it opens; the guest may or may not finish booting.
        guest = subprocess.Popen(guest_command(host, "idle"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=env)
        try:
            assert eventually(lambda: "rejected device" in host.log())
        finally:
            guest.kill()
            guest.wait()
        rc, _, err = run_guest(host, "echo-demo", "100")  # a guest without the device: served as ever
        assert rc == 0, err
        assert host.stop() == 0
        log = host.log()
    lines = _warnings(log, r"partition 1: rejected device: channel \d+: ValueError\('the failing device tripped")
    assert len(lines) == 1, log
    assert ("Traceback" in log) == (level == "debug"), log


def test_a_partition_that_cannot_be_set_up_is_one_line(tmp_path: Path) -> None:
    env = {**env_with(install_plugin(tmp_path, "failing", FAILING_DEVICE)), "FAIL_WHEN": "made"}
    with logged_host(tmp_path, "--device", "echo", "--device", "failing", env=env) as host:
        for _ in range(2):
            rc, _, err = run_guest(host, "echo-demo", "100", env=env)
            assert rc != 0  # the guest's partition is gone; the host is not
        assert host.proc.poll() is None and host.inspect()["ok"]
        assert host.stop() == 0
        log = host.log()
    for partition in (1, 2):
        lines = _warnings(log, rf"partition {partition}: failed, releasing it .*RuntimeError: cannot set up")
        assert len(lines) == 1, log
    assert "Traceback" not in log
