"""Boot, clean shutdown, version fallback, many guests, the example device
through ``pvbus run``: all with real host and guest processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .harness import PVBUS, host_process, run_guest


def test_boot_echo_and_clean_shutdown(tmp_path: Path) -> None:
    with host_process(tmp_path, "--device", "echo") as host:  # only the device whose signals it counts
        rc, out, err = run_guest(host, "echo-demo", "300")
        assert rc == 0, err
        (report,) = out
        assert report["requests"] == 300 and report["version"] == "0x50003"
        assert host.settled()["partitions"] == []  # everything of the guest released


SIGNALLING_PROGRAM = '''
import json, sys
import trio

async def main(kernel, argv):
    echo = kernel.device("echo")
    for i in range(300):
        assert await echo.echo(i.to_bytes(8, "little")) == i.to_bytes(8, "little")
    print(json.dumps({"signals": kernel.hypercalls.exits.get("signal_event", 0)}), flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)  # stay until the test has looked
    return 0
'''


def test_every_signal_the_guest_sends_reaches_the_host(tmp_path: Path) -> None:
    """However scheduling decides how many requests found the host asleep,
    each HvSignalEvent the guest counted arrives at the host's doorbell of
    the channel, none lost and none invented."""
    import json
    import os
    import time

    from .harness import guest_command

    (tmp_path / "signalling.py").write_text(SIGNALLING_PROGRAM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    with host_process(tmp_path, "--device", "echo") as host:
        guest = subprocess.Popen(guest_command(host, "signalling:main"), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env)
        try:
            assert guest.stdout is not None and guest.stdin is not None
            sent = json.loads(guest.stdout.readline())["signals"]
            assert sent >= 1  # the first request found the host asleep

            def received() -> int:
                (part,) = host.inspect()["partitions"]
                return sum(ch["guest_signals"] for ch in part["channels"])

            deadline = time.monotonic() + 30  # the host reads its doorbell on its own schedule
            while received() != sent and time.monotonic() < deadline:
                time.sleep(0.05)
            assert received() == sent
            guest.stdin.close()
            assert guest.wait(timeout=30) == 0
        finally:
            if guest.poll() is None:
                guest.kill()
                guest.wait()


@pytest.mark.parametrize(
    ("host_versions", "expect"),
    [("4.0,3.0", "0x40000"), ("5.2,5.0,4.1", "0x50002"), ("3.0", "0x30000")],
)
def test_version_fallback(tmp_path: Path, host_versions: str, expect: str) -> None:
    """An older host makes the guest fall back, newest first; below 5.0 the
    host does not know connection id 4 and refuses the post itself."""
    with host_process(tmp_path, "--versions", host_versions) as host:
        rc, out, err = run_guest(host, "echo-demo", "20")
        assert rc == 0, err
        assert out[0]["version"] == expect


def test_no_common_version_fails_cleanly(tmp_path: Path) -> None:
    with host_process(tmp_path, "--versions", "5.3") as host:
        rc, out, err = run_guest(host, "echo-demo", "5", versions="5.2,5.1")
        assert rc != 0 and "none of our VMBus versions" in err
        assert host.settled()["partitions"] == []


def test_eight_guests_at_once(tmp_path: Path) -> None:
    from .harness import guest_command

    with host_process(tmp_path, "--device", "echo") as host:  # the echo traffic it checks
        procs = [subprocess.Popen(guest_command(host, "echo-demo", "500"), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(8)]
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, [r[1][-500:] for r in results]
        assert host.settled()["partitions"] == []


def test_pvbus_run_pairs_host_and_guest() -> None:
    res = subprocess.run([*PVBUS, "run", "--program", "echo-demo", "--ram", "32", "--", "200"],
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert b'"requests": 200' in res.stdout


def test_pvbus_inspect_shows_partitions_channels_and_rings(tmp_path: Path) -> None:
    import json
    import signal

    from .harness import guest_command

    with host_process(tmp_path, "--device", "echo") as host:  # one device: the counts below are its own
        guest = subprocess.Popen(guest_command(host, "idle"), stdout=subprocess.PIPE)
        try:
            assert guest.stdout is not None and json.loads(guest.stdout.readline())["booted"]
            res = subprocess.run([*PVBUS, "inspect", "--socket", host.socket], capture_output=True, timeout=30)
            snap = json.loads(res.stdout)
            (part,) = snap["partitions"]
            assert part["version"] == "0x50003"
            # INITIATE_CONTACT, REQUESTOFFERS, GPADL_HEADER (4-page rings: no body), OPENCHANNEL
            assert part["exits"]["post_message"] == 4 and part["exits"]["wrmsr"] >= 2  # SIMP, SIEFP, then EOMs
            (chan,) = part["channels"]
            assert chan["device"] == "echo" and chan["state"] == "open"
            assert chan["ring"]["incoming"]["data_size"] == 4 * 4096
            assert chan["ring"]["incoming"]["feature_bits"] == 1
        finally:
            guest.send_signal(signal.SIGTERM)
            assert guest.wait(timeout=30) == 0
