"""A guest whose host goes away stops, says so in one line and fails.

Real processes and real signals: guests under load (echo requests in
flight, disk I/O, one idle) see their host SIGKILLed, SIGTERMed, or rescind
every device and then die; each must exit non-zero within a generous
deadline (not hang), with one line on stderr and no traceback.  In process,
requests in flight and later calls fail with ``HostGone``, and a boot that
waits for an answer fails the same way when the host hangs up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from guest_kernel.kernel import GuestKernel
from vmbus.device import load_devices
from vmbus.errors import ChannelRevoked, HostGone

from ..bus.harness import PVBUS, SINK_MODULE, env_with, install_plugin

DEADLINE = 10.0  # "within about a second", asserted generously: not hung

DISK_LOOP = '''
import json

import trio


async def main(kernel, argv):
    """Write and read back four blocks over and over; one progress line a
    fifth of a second."""
    disk = kernel.device("storage")
    done = 0

    async def worker(k):
        nonlocal done
        block = bytes([k + 1]) * 4096
        while True:
            await disk.write(k * 4096, block)
            if await disk.read(k * 4096, 4096) != block:
                raise RuntimeError("read back something else")
            done += 1

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(worker, k)
        while True:
            await trio.sleep(0.2)
            print(json.dumps({"ios": done}), flush=True)
'''


@contextmanager
def _host(tmp_path: Path, *args: str,
          env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A ``pvbus host`` the test may kill; whatever is left of it is killed after."""
    sock = str(tmp_path / "host.sock")
    proc = subprocess.Popen([*PVBUS, "host", "--socket", sock, *args], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _admin(sock: str, request: dict[str, Any]) -> dict[str, Any]:
    from vmbus.host import admin_request

    return trio.run(admin_request, sock, request)


def _guest(socket_path: str, program: str, *argv: str, cwd: Path) -> subprocess.Popen[bytes]:
    cmd = [*PVBUS, "guest", "--socket", socket_path, "--ram", "32", "--program", program, "--", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)


def _working(proc: subprocess.Popen[bytes], key: str) -> None:
    """Wait until the guest's progress count on ``key`` has grown (it is busy)."""
    assert proc.stdout is not None
    seen: list[int] = []
    while len(seen) < 2 or seen[-1] <= seen[0]:
        line = proc.stdout.readline()
        assert line, f"guest stopped before working: {proc.stderr.read().decode() if proc.stderr else ''}"
        seen.append(json.loads(line)[key])


@contextmanager
def _guests_under_load(host_socket: str, tmp_path: Path,
                       echo_guests: int = 2) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``echo_guests`` echo-load guests, one writing and reading its disk (a
    program imported from the working directory), one idle; all busy or booted."""
    (tmp_path / "diskloop.py").write_text(DISK_LOOP)
    guests = [_guest(host_socket, "echo-load", "4", cwd=tmp_path) for _ in range(echo_guests)]
    guests.append(_guest(host_socket, "diskloop:main", cwd=tmp_path))
    guests.append(_guest(host_socket, "idle", cwd=tmp_path))
    try:
        for proc, key in zip(guests[:-1], ["echoes"] * echo_guests + ["ios"], strict=True):
            _working(proc, key)
        idle = guests[-1]
        assert idle.stdout is not None and json.loads(idle.stdout.readline())["booted"]
        yield guests
    finally:
        for proc in guests:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def _each_says_one_line(guests: list[subprocess.Popen[bytes]], *expected: str) -> list[str]:
    """Every guest exits non-zero before the deadline with exactly one line
    on stderr, containing one of ``expected``; returns the lines."""
    lines = []
    for proc in guests:
        try:
            _, err = proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"guest {proc.pid} still running {DEADLINE} s after its host went: hung")
        text = err.decode()
        assert proc.returncode not in (0, None), text
        assert "Traceback" not in text, text
        assert len(text.splitlines()) == 1, text
        assert text.startswith("pvbus guest: ") and any(word in text for word in expected), text
        lines.append(text.strip())
    return lines


def test_guests_stop_when_their_host_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the host under load: two echo-load guests (requests in
    flight), one doing disk I/O, one idle; none touches the control socket
    while it waits, each notices the hang-up."""
    with _host(tmp_path, "--disk", str(tmp_path / "disk.img"), "--disk-size", "16M") as (host, sock):
        with _guests_under_load(sock, tmp_path) as guests:
            host.send_signal(signal.SIGKILL)
            lines = _each_says_one_line(guests, "the host went away")
    assert lines == ["pvbus guest: the host went away (it closed the control socket)"] * 4


def test_guests_stop_when_their_host_is_stopped(tmp_path: Path) -> None:
    """SIGTERM (a host stopping on purpose): however it takes leave (rescinds,
    then closes), every guest stops with one line and a failure status."""
    with _host(tmp_path, "--disk", str(tmp_path / "disk.img"), "--disk-size", "16M") as (host, sock):
        with _guests_under_load(sock, tmp_path, echo_guests=1) as guests:
            host.send_signal(signal.SIGTERM)
            lines = _each_says_one_line(guests, "the host went away", "the host removed")
        assert host.wait(timeout=30) == 0
    # the busy ones saw their device go; the idle one, whose program used none, saw the host go
    # (which of its devices it names depends on how far the host's rescinds got: echo among them)
    removed = re.fullmatch(r"pvbus guest: the host removed device (.+) while program echo-load used it "
                           r"\(channel \d+ was rescinded\)", lines[0])
    assert (removed is not None and "echo" in removed.group(1).split(", ")) or "the host went away" in lines[0]
    assert lines[-1] == "pvbus guest: the host went away (it closed the control socket)"


def test_every_device_rescinded_then_host_killed(tmp_path: Path) -> None:
    """The host rescinds every device of every guest, then dies: each guest
    stops with one line and a failure status."""
    with _host(tmp_path, "--disk", str(tmp_path / "disk.img"), "--disk-size", "16M") as (host, sock):
        with _guests_under_load(sock, tmp_path, echo_guests=1) as guests:
            snapshot = _admin(sock, {"cmd": "inspect"})
            for part in snapshot["partitions"]:
                rescinded = set()
                for channel in part["channels"]:
                    req = {"cmd": "rescind", "partition": part["id"], "relid": channel["relid"]}
                    if _admin(sock, req)["ok"]:  # (a sub-channel goes with its primary: may be gone already)
                        rescinded.add(channel["device"])
                assert {"echo"} <= rescinded, (part["id"], rescinded)
            host.send_signal(signal.SIGKILL)
            _each_says_one_line(guests, "the host went away", "the host removed")


def test_requests_in_flight_fail_with_host_gone(tmp_path: Path) -> None:
    """In process: requests the host holds (the sink device never answers)
    fail with HostGone when the host is killed, as do echoes in flight; the
    kernel's watcher raises it into the nursery, cancelling the program;
    later calls for a device get HostGone too."""
    site = install_plugin(tmp_path, "sink", SINK_MODULE)
    with _host(tmp_path, env=env_with(site)) as (host, sock):

        async def scenario() -> None:
            kernel = GuestKernel(load_devices(), ram_size=16 << 20)
            held_outcomes: list[BaseException] = []
            echo_outcomes: list[BaseException] = []
            cancelled: list[str] = []
            try:
                with pytest.raises(BaseExceptionGroup) as raised:
                    async with trio.open_nursery() as nursery:
                        await kernel.boot(sock, nursery)
                        echo, sink = kernel.device("echo"), kernel.device("sink")

                        async def held(k: int) -> None:
                            try:
                                await sink.requests.request(b"never answered %d" % k)
                            except ChannelRevoked as exc:
                                held_outcomes.append(exc)

                        async def hammer(k: int) -> None:
                            try:
                                while True:
                                    assert await echo.echo(b"%d" % k) == b"%d" % k
                            except ChannelRevoked as exc:
                                echo_outcomes.append(exc)

                        for k in range(4):
                            nursery.start_soon(held, k)
                            nursery.start_soon(hammer, k)
                        with trio.fail_after(DEADLINE):
                            while sink.channel.stats.packets_sent < 4 or echo.channel.stats.packets_received < 20:
                                await trio.sleep(0.01)
                        host.send_signal(signal.SIGKILL)
                        try:
                            await trio.sleep(DEADLINE)  # the program: cancelled once the host is found gone
                        except trio.Cancelled:
                            cancelled.append("program")
                            raise
                assert cancelled == ["program"]
                assert [type(e) for e in raised.value.exceptions] == [HostGone]
                # every request the host held failed with HostGone, none hung
                assert [type(e) for e in held_outcomes] == [HostGone] * 4
                assert sink.requests.failed_in_flight == 4
                assert all(isinstance(e, HostGone) for e in echo_outcomes)  # (others were cancelled between echoes)
                assert str(held_outcomes[0]) == "the host went away (it closed the control socket)"
                assert kernel.host_gone == str(held_outcomes[0])
                with pytest.raises(HostGone):
                    kernel.device("echo")
            finally:
                kernel.close()

        trio.run(scenario)


def _silent_host(path: str, replies: int, answered: threading.Event, hang_up: threading.Event) -> None:
    """A host that answers the first ``replies`` exits with HV_STATUS_SUCCESS,
    sets ``answered``, sends no VMBus message at all, and closes the
    connection once ``hang_up`` is set."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
        with conn:
            for _ in range(replies):
                _, anc, _, _ = conn.recvmsg(512, socket.CMSG_SPACE(16))
                for level, kind, data in anc:  # the RAM and SINT fds of CONNECT: not needed here
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for fd in struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4]):
                            os.close(fd)
                conn.send(struct.pack("<I", 0))
            answered.set()
            hang_up.wait(DEADLINE * 3)

    threading.Thread(target=serve, daemon=True).start()


def test_boot_waiting_for_an_answer_fails_when_the_host_hangs_up(tmp_path: Path) -> None:
    """CONNECT, two MSR writes and INITIATE_CONTACT answered, then no version
    response ever: the guest waits for it, and the host's hang-up ends the
    wait with "the host went away", not the boot timeout's "no answer"."""
    path = str(tmp_path / "silent.sock")
    answered, hang_up = threading.Event(), threading.Event()
    _silent_host(path, 4, answered, hang_up)
    proc = subprocess.Popen([*PVBUS, "guest", "--socket", path, "--ram", "16", "--program", "idle"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert answered.wait(DEADLINE * 3), "the guest never got as far as INITIATE_CONTACT"
        hang_up.set()
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        hang_up.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = err.decode()
    assert proc.returncode == 1, text
    assert text.splitlines() == ["pvbus guest: the host went away (it closed the control socket)"], text


def test_ctrl_c_while_waiting_for_the_host_is_quiet(tmp_path: Path) -> None:
    """SIGINT to a guest whose boot waits for a silent host: status 130 and
    nothing on stderr (no traceback, no KeyboardInterrupt)."""
    path = str(tmp_path / "silent.sock")
    answered, hang_up = threading.Event(), threading.Event()
    _silent_host(path, 4, answered, hang_up)
    proc = subprocess.Popen([*PVBUS, "guest", "--socket", path, "--ram", "16", "--program", "idle"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert answered.wait(DEADLINE * 3), "the guest never got as far as INITIATE_CONTACT"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        hang_up.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err.decode()) == (130, "")
