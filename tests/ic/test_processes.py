"""The integration services between a real host process and real guest processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.bus.harness import HostProcess, guest_command
from vmbus.protocols import ic

GUEST_PROGRAMS = '''
"""Guest programs for the IC process tests: each prints JSON lines."""
import json
import time

import trio


def say(**fields):
    print(json.dumps(fields), flush=True)


async def clock(kernel, argv):
    timesync = kernel.device("timesync")
    with trio.fail_after(30):
        await timesync.synced.wait()
    before, now, after = time.time(), timesync.now(), time.time()
    say(offset=timesync.offset, now=now, before=before, after=after, samples=timesync.samples)
    return 0


async def kvp_exchange(kernel, argv):
    kvp = kernel.device("kvp")
    with trio.fail_after(30):
        role = await kvp.wait_for("external", "role")
    await kvp.set("guest", "answer", role.upper())
    say(role=role, guest=kvp.items("guest"))
    await trio.sleep_forever()


async def wait_to_be_stopped(kernel, argv):
    say(booted=True)
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        say(cancelled=True, request=vars(kernel.device("shutdown").request))
        raise
'''


@contextmanager
def ic_host(tmp_path: Path, config: dict[str, Any]) -> Iterator[HostProcess]:
    """A real host process with these IC settings (``pvbus.launch.host_main``
    with a device configuration), stopped with SIGTERM."""
    sock = str(tmp_path / "host.sock")
    code = (f"import trio, json; from pvbus.launch import host_main; "
            f"trio.run(host_main, {sock!r}, None, None, json.loads({json.dumps(config)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("ready"), f"host did not start: {line!r}"
        yield HostProcess(proc, sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@contextmanager
def guest(host: HostProcess, tmp_path: Path, program: str) -> Iterator[subprocess.Popen[bytes]]:
    (tmp_path / "ic_programs.py").write_text(GUEST_PROGRAMS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(guest_command(host, f"ic_programs:{program}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def line(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    text = proc.stdout.readline()
    assert text, f"the guest said nothing (exit {proc.poll()})"
    found: dict[str, Any] = json.loads(text)
    return found


def ic_state(host: HostProcess, device: str) -> dict[str, Any]:
    snap = host.inspect()
    (part,) = snap["partitions"]
    (channel,) = [c for c in part["channels"] if c["device"] == device]
    state: dict[str, Any] = channel["device_state"]
    return state


def eventually(host: HostProcess, device: str, condition: Callable[[dict[str, Any]], bool],
               timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = ic_state(host, device)
        except ValueError:  # no partition yet
            state = {}
        if state and condition(state):
            return state
        assert time.monotonic() < deadline, f"{device}: {state}"
        time.sleep(0.05)


def test_heartbeat_in_inspect_and_a_stopped_guest_reported_lost(tmp_path: Path) -> None:
    interval = 0.2
    with ic_host(tmp_path, {"heartbeat": {"interval": interval}}) as host, \
            guest(host, tmp_path, "wait_to_be_stopped") as proc:
        assert line(proc) == {"booted": True}
        alive = eventually(host, "heartbeat", lambda s: s["health"] == "alive" and s["beats_answered"] >= 2)
        assert alive["state"] == "ready" and alive["sequence"] >= 2 and alive["last_seen_ago"] < 30
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            stopped_at = time.time()
            lost = eventually(host, "heartbeat", lambda s: s["health"] == "lost")
            assert lost["missed"] >= 3 and lost["last_seen"] <= stopped_at
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        back = eventually(host, "heartbeat", lambda s: s["health"] == "alive")
        assert back["last_seen"] > stopped_at and back["missed"] == 0


def test_timesync_offset_within_a_millisecond_of_the_host_clock(tmp_path: Path) -> None:
    with ic_host(tmp_path, {}) as host, guest(host, tmp_path, "clock") as proc:
        got = line(proc)
        assert proc.wait(timeout=30) == 0
        assert got["samples"] >= 1
        assert abs(got["offset"]) < 1e-3  # same machine, same clock: the offset is the measurement error
        assert got["before"] - 1e-3 < got["now"] < got["after"] + 1e-3


def test_kvp_round_trip_between_host_and_guest(tmp_path: Path) -> None:
    config = {"kvp": {"values": {"role": "web server"}, "refresh": 0.2}}
    with ic_host(tmp_path, config) as host, guest(host, tmp_path, "kvp_exchange") as proc:
        got = line(proc)  # host -> guest: the guest program read the value the host set
        assert got["role"] == "web server" and got["guest"]["answer"] == "WEB SERVER"
        assert "OSName" in got["guest"] and "NetworkAddressIPv4" in got["guest"]
        # guest -> host: the host's copy of the guest pool holds everything the guest published
        state = eventually(host, "kvp", lambda s: s["pools"]["guest"] == len(got["guest"]))
        assert state["pools"]["external"] == 1


def partition_of(host: HostProcess) -> int:
    (part,) = host.inspect()["partitions"]
    return int(part["id"])


def test_shutdown_through_the_admin_socket_cancels_the_program_and_exits_0(tmp_path: Path) -> None:
    with ic_host(tmp_path, {}) as host, guest(host, tmp_path, "wait_to_be_stopped") as proc:
        assert line(proc) == {"booted": True}
        eventually(host, "shutdown", lambda s: s["state"] == "ready")
        request = {"cmd": "device", "partition": partition_of(host), "device": "shutdown", "command": "shutdown",
                   "args": {"reboot": True, "force": False}}
        assert host.admin(request) == {"ok": True, "action": "reboot", "force": False}
        got = line(proc)
        assert got["cancelled"] is True and got["request"]["flags"] == ic.SHUTDOWN_RESTART
        assert proc.wait(timeout=30) == 0
        assert host.admin({"cmd": "wait", "partitions": 0})["ok"]  # it released everything and left


def test_kvp_commands_through_the_admin_socket(tmp_path: Path) -> None:
    config = {"kvp": {"values": {"role": "cache"}}}
    with ic_host(tmp_path, config) as host, guest(host, tmp_path, "kvp_exchange") as proc:
        assert line(proc)["role"] == "cache"
        part = partition_of(host)

        def kvp(command: str, **args: Any) -> dict[str, Any]:
            return host.admin({"cmd": "device", "partition": part, "device": "kvp", "command": command, "args": args})

        assert kvp("get", key="answer") == {"ok": True, "key": "answer", "value": "CACHE"}
        listed = kvp("list", pool="guest")
        assert listed["ok"] and listed["items"]["answer"] == "CACHE" and "OSName" in listed["items"]
        assert kvp("set", pool="external", key="later", value="x") == {"ok": True, "key": "later"}
        assert kvp("get", pool="external", key="later")["value"] == "x"
        too_long = kvp("set", key="k" * 256, value="v")
        assert not too_long["ok"] and "at most 512" in too_long["error"]
        assert not kvp("get", key="nothing")["ok"]
        assert not host.admin({"cmd": "device", "partition": part, "device": "kvp", "command": "get",
                               "args": {"key": ["nested"]}})["ok"]
        assert not host.admin({"cmd": "device", "partition": part, "device": "nope", "command": "get"})["ok"]
