"""The admin socket under abuse: every malformed or hostile request gets an
error answer and the host goes on serving guests; clients that hang up, stall
or crowd in cost nothing.  The parser and the connection handling are also
driven in-process (no host), where a stalled client can be timed out on a
virtual clock."""

from __future__ import annotations

import json
import math
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from vmbus import admin
from vmbus.admin import AdminError, Inspect, Rescind, Wait, parse_request

from ..bus.harness import fd_count, guest_command, run_guest
from .processes import admin_answer, eventually, logged_host

MALFORMED = [
    b"[]\n",
    b'"x"\n',
    b"42\n",
    b"null\n",
    b"not json\n",
    b"\xff\xfe\n",
    b'{"cmd": "wait", "partitions": 1e400}\n',
    b'{"cmd": "wait", "partitions": 1.5}\n',
    b'{"cmd": "wait", "partitions": true}\n',
    b'{"cmd": "wait", "partitions": -1}\n',
    b'{"cmd": "wait", "partitions": 1, "timeout": 1e400}\n',
    b'{"cmd": "wait", "partitions": 1, "timeout": NaN}\n',
    b'{"cmd": "wait", "partitions": 1, "timeout": "soon"}\n',
    b'{"cmd": "wait"}\n',
    b'{"cmd": "rescind", "partition": 1}\n',
    b'{"cmd": "rescind", "partition": 99999999999999999999, "relid": 1}\n',
    b'{"cmd": "rescind", "partition": 1, "relid": 1, "extra": 0}\n',
    b'{"cmd": "inspect", "cmd": "inspect"}\n',
    b'{"cmd": ["inspect"]}\n',
    b'{"cmd": "reboot"}\n',
    b"{}\n",
    b"[" * 2000 + b"]" * 2000 + b"\n",  # nested past the JSON parser's recursion limit
    b'{"cmd": "inspect", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}\n",
    b"[" * 100_000 + b"\n",  # past the line limit
    b"x" * 1_000_000,  # no newline at all
]


def _error(answer: dict[str, Any]) -> str:
    assert answer["ok"] is False, answer
    assert isinstance(answer["error"], str) and answer["error"] and "\n" not in answer["error"]
    return str(answer["error"])


def test_malformed_requests_are_answered_with_errors(tmp_path: Path) -> None:
    with logged_host(tmp_path) as host:
        for payload in MALFORMED:
            _error(admin_answer(host.socket, payload))
            assert host.proc.poll() is None, f"the host died on {payload[:60]!r}"
        # A guest to rescind from: unknown relids and partitions are errors too.
        idle = subprocess.Popen(guest_command(host, "idle"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert json.loads(idle.stdout.readline())["booted"]  # type: ignore[union-attr]
            (partition,) = [p["id"] for p in host.inspect()["partitions"]]
            assert "relid 9" in _error(admin_answer(
                host.socket, json.dumps({"cmd": "rescind", "partition": partition, "relid": 9}).encode() + b"\n"))
            assert "no partition" in _error(admin_answer(
                host.socket, json.dumps({"cmd": "rescind", "partition": partition + 100, "relid": 1}).encode() + b"\n"))
        finally:
            idle.kill()
            idle.wait()
        assert host.proc.poll() is None
        # Still serving: a guest runs, and the admin socket answers.
        rc, lines, err = run_guest(host, "echo-demo", "200")
        assert rc == 0, err
        assert host.inspect()["ok"]
        assert host.admin({"cmd": "wait", "partitions": 0})["ok"]
        assert "Traceback" not in host.log()
        assert host.stop() == 0


def _hang_up_after(path: str, request: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(f"{path}.admin")
        s.sendall(request)
    # closed before the answer could be read


def test_clients_hanging_up_mid_answer_cost_nothing(tmp_path: Path) -> None:
    with logged_host(tmp_path) as host:
        host.inspect()
        baseline = fd_count(host.proc.pid)
        for _ in range(10):
            _hang_up_after(host.socket, b'{"cmd": "inspect"}\n')
        _hang_up_after(host.socket, b'{"cmd": "wait", "partitions": 3, "timeout": 0.5}\n')
        _hang_up_after(host.socket, b'{"cmd": "ins')  # half a request
        assert host.proc.poll() is None
        assert host.inspect()["ok"]
        # every connection's fd is closed once its answer failed
        assert eventually(lambda: fd_count(host.proc.pid) <= baseline), (fd_count(host.proc.pid), baseline)
        rc, lines, err = run_guest(host, "echo-demo", "200")
        assert rc == 0, err
        assert "Traceback" not in host.log()
        assert host.stop() == 0


def test_admin_connections_are_bounded(tmp_path: Path) -> None:
    with logged_host(tmp_path) as host:
        idle = []
        try:
            for _ in range(admin.MAX_CONNECTIONS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(f"{host.socket}.admin")
                idle.append(s)
            # Every slot is held by a client saying nothing (accepted in order,
            # before this one): the next one waits in the backlog, unanswered.
            late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            late.connect(f"{host.socket}.admin")
            late.sendall(b'{"cmd": "inspect"}\n')
            late.settimeout(1.0)
            with pytest.raises(TimeoutError):
                late.recv(65536)
        finally:
            for s in idle:
                s.close()
        # the slots come back as the idle clients' connections end, and the late client is served
        late.settimeout(30)
        answer = b""
        while chunk := late.recv(65536):
            answer += chunk
        late.close()
        assert json.loads(answer)["ok"] is True
        assert host.proc.poll() is None
        assert host.stop() == 0


# -- in-process: the parser and one connection -----------------------------------------


def test_parse_request_accepts_exactly_the_documented_shapes() -> None:
    assert parse_request(b'{"cmd": "inspect"}\n') == Inspect()
    assert parse_request(b'{"cmd": "rescind", "partition": 3, "relid": 2}') == Rescind(3, 2)
    assert parse_request(b'{"cmd": "wait", "partitions": 2}') == Wait(2, admin.DEFAULT_WAIT)
    assert parse_request(b'{"cmd": "wait", "partitions": 0, "timeout": 1.5}') == Wait(0, 1.5)
    for payload in MALFORMED:
        with pytest.raises(AdminError):
            parse_request(payload.rstrip(b"\n"))
    with pytest.raises(AdminError, match="from 1 to 4095"):
        parse_request(b'{"cmd": "rescind", "partition": 1, "relid": 4096}')


class FakeHost:
    """An ``AdminHost`` whose calls can fail as a buggy host would."""

    def __init__(self) -> None:
        self.rescinded: list[tuple[int, int]] = []

    def inspect(self) -> dict[str, Any]:
        return {"partitions": [], "odd": math.inf}  # not JSON: the encoder must cope

    def rescind(self, partition: int, relid: int) -> None:
        if partition == 13:
            raise RuntimeError("a bug in the host")
        self.rescinded.append((partition, relid))

    async def wait_partitions(self, count: int, timeout: float) -> dict[str, Any]:
        await trio.sleep(timeout)
        return {"ok": True, "partitions": count}

    async def device_command(self, partition: int, device: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
        raise admin.AdminError(f"partition {partition} has no device {device!r}")


async def test_dispatch_turns_every_failure_into_an_error_answer() -> None:
    host = FakeHost()
    assert json.loads(await admin.answer_line(b'{"cmd": "rescind", "partition": 2, "relid": 1}', host)) == {"ok": True}
    assert host.rescinded == [(2, 1)]
    assert "a bug in the host" in _error(json.loads(
        await admin.answer_line(b'{"cmd": "rescind", "partition": 13, "relid": 1}', host)))
    assert "not encodable" in _error(json.loads(await admin.answer_line(b'{"cmd": "inspect"}', host)))


async def test_a_silent_client_is_timed_out(autojump_clock: trio.testing.MockClock) -> None:
    host_end, client_end = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with trio.fail_after(admin.REQUEST_TIMEOUT + admin.ANSWER_TIMEOUT + 1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admin.serve_connection, host_end, FakeHost())
            answer = await client_end.receive_some()
            answered = trio.current_time()
            await client_end.aclose()
    assert "no request within" in _error(json.loads(answer))
    assert answered - start == pytest.approx(admin.REQUEST_TIMEOUT)


async def test_a_client_that_never_reads_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    host_end, client_end = trio.testing.lockstep_stream_pair()  # no buffer: the answer waits for a reader
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_end.send_all, b'{"cmd": "wait", "partitions": 0, "timeout": 0}\n')
        with trio.fail_after(admin.ANSWER_TIMEOUT + 1):
            await admin.serve_connection(host_end, FakeHost())  # returns, having given up on the client
