"""The sockets device between a real host process, real guest processes and
real host services (stdlib servers on loopback, Unix sockets)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.bus.harness import HostProcess, guest_command, host_process
from tests.sockets.guest_programs import block

PROGRAMS = "tests.sockets.guest_programs"
HTTP_PORT, BULK_PORT, ECHO_PORT, SINK_PORT, LISTEN_PORT, NOBODY = 80, 5001, 5002, 5003, 7000, 4444


class _Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 overflows when the host connects 16
    # at a time; past it Linux answers with SYN cookies, and a cookie that
    # fails to validate resets the connection (TcpExtSyncookiesFailed).
    request_queue_size = 128


@contextmanager
def tcp_server(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    server = _Threaded(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class BulkHandler(socketserver.BaseRequestHandler):
    """``seed size\\n`` + data: sends seed + 1000's data back while reading,
    then the SHA-256 and count of what it read."""

    def handle(self) -> None:
        sock = self.request
        head = b""
        while not head.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte:
                return
            head += byte
        seed, size = map(int, head.split())
        sender = threading.Thread(target=self._send_back, args=(sock, seed + 1000, size))
        sender.start()
        h, count = hashlib.sha256(), 0
        while data := sock.recv(1 << 16):
            h.update(data)
            count += len(data)
        sender.join()
        sock.sendall(f"\n{h.hexdigest()} {count}".encode())
        sock.shutdown(socket.SHUT_WR)

    @staticmethod
    def _send_back(sock: socket.socket, seed: int, size: int) -> None:
        chunk = block(seed)
        for _ in range(size // len(chunk)):
            sock.sendall(chunk)


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = b""
        while more := self.request.recv(4096):
            data += more
        self.request.sendall(data[::-1])


class SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while self.request.recv(1 << 16):
            pass


class QuietHttp(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_server(root: Path) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: QuietHttp(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def sockets_host(tmp_path: Path, services: dict[int, str], *extra: str) -> Any:
    spec = ";".join(f"{port}={target}" for port, target in services.items())
    return host_process(tmp_path, "--device", f"sockets:services={spec}", *extra)


def run_program(host: HostProcess, program: str, *argv: str, timeout: float = 120, ram: int = 64) -> list[dict]:
    res = subprocess.run(guest_command(host, f"{PROGRAMS}:{program}", *argv, ram=ram), capture_output=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    return [json.loads(x) for x in res.stdout.decode().splitlines() if x.startswith("{")]


def device_state(host: HostProcess) -> dict[str, Any]:
    (part,) = host.inspect()["partitions"]
    (channel,) = [c for c in part["channels"] if c["device"] == "sockets" and "device_state" in c]
    state: dict[str, Any] = channel["device_state"]
    return state


def test_http_client_in_the_guest_reaches_a_host_http_server(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    body = os.urandom(300_000)
    (root / "blob.bin").write_bytes(body)
    with http_server(root) as port, sockets_host(tmp_path, {HTTP_PORT: f"tcp:127.0.0.1:{port}"}) as host:
        (answer,) = run_program(host, "http_get", str(HTTP_PORT), "/blob.bin")
        assert answer == {"status": 200, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        (missing,) = run_program(host, "http_get", str(HTTP_PORT), "/nothing-here")
        assert missing["status"] == 404


def bulk_run(tmp_path: Path, connections: int, size: int) -> None:
    with tcp_server(BulkHandler) as port, sockets_host(tmp_path, {BULK_PORT: f"tcp:127.0.0.1:{port}"}) as host:
        (result,) = run_program(host, "bulk", str(BULK_PORT), str(connections), str(size), timeout=900, ram=128)
        assert result == {"connections": connections, "all_ok": True, "bad": []}
        state = host.settled(0)
        assert state["partitions"] == []


def test_concurrent_connections_move_checksummed_data_both_ways_with_half_close(tmp_path: Path) -> None:
    bulk_run(tmp_path, 64, 1 << 20)


@pytest.mark.soak
def test_64_connections_of_16_mib_each(tmp_path: Path) -> None:
    bulk_run(tmp_path, 64, 16 << 20)


def test_a_port_nobody_serves_is_refused_and_the_device_goes_on(tmp_path: Path) -> None:
    with tcp_server(EchoHandler) as port, sockets_host(tmp_path, {ECHO_PORT: f"tcp:127.0.0.1:{port}"}) as host:
        lines = run_program(host, "refused", str(NOBODY), str(ECHO_PORT))
        assert lines[0]["refused"] is True and "port 4444" in lines[0]["message"]
        assert [x["bad_address"] for x in lines[1:3]] == ["not-a-port", str(0x80000000)]
        assert lines[3] == {"after_refusal": "ereh llits"}


def test_a_host_service_that_is_down_is_refused(tmp_path: Path) -> None:
    dead = tmp_path / "nobody-listens.sock"
    with tcp_server(EchoHandler) as port, \
            sockets_host(tmp_path, {5999: f"unix:{dead}", ECHO_PORT: f"tcp:127.0.0.1:{port}"}) as host:
        lines = run_program(host, "refused", "5999", str(ECHO_PORT))
        assert lines[0]["refused"] is True and "port 5999" in lines[0]["message"]
        assert lines[3] == {"after_refusal": "ereh llits"}


class UnixClient:
    """A host program reaching a guest port through the per-guest Unix socket."""

    def __init__(self, path: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            byte = self.sock.recv(1)
            if not byte:
                break
            line += byte
        self.answer = line.decode()

    def exchange(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        self.sock.shutdown(socket.SHUT_WR)
        out = b""
        while more := self.sock.recv(1 << 16):
            out += more
        self.sock.close()
        return out


def wait_for(condition: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


def test_host_programs_reach_a_guest_port_through_the_unix_socket_handshake(tmp_path: Path) -> None:
    with sockets_host(tmp_path, {}) as host:
        proc = subprocess.Popen(guest_command(host, f"{PROGRAMS}:listen_upper", str(LISTEN_PORT), "2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"listening": True}
            path = wait_for(lambda: device_state(host)["socket"])
            assert path == f"{host.socket}.vsock.1"
            assert os.stat(path).st_mode & 0o777 == 0o600
            # A port nobody listens on: the offer is not accepted, the socket
            # closes without OK.  (First: the guest program ends after two
            # connections to its port, and its socket goes with it.)
            assert UnixClient(path, LISTEN_PORT + 1).answer == ""
            payload = os.urandom(200_000).hex().encode()
            for _ in range(2):
                client = UnixClient(path, LISTEN_PORT)
                assert client.answer.startswith("OK ") and client.answer.endswith("\n")
                assert client.exchange(payload) == payload.upper()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        host.settled(0)


def test_a_guest_killed_mid_transfer_leaves_the_hosts_fds_as_they_were(tmp_path: Path) -> None:
    with tcp_server(SinkHandler) as port, sockets_host(tmp_path, {SINK_PORT: f"tcp:127.0.0.1:{port}"}) as host:
        before = host.inspect()["open_fds"]
        proc = subprocess.Popen(guest_command(host, f"{PROGRAMS}:stream_forever", str(SINK_PORT), "8"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"streaming": True}
            busy = device_state(host)
            assert len(busy["connections"]) == 8 and host.inspect()["open_fds"] > before
            wait_for(lambda: all(c["to_host"] > 0 for c in device_state(host)["connections"]))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        host.settled(0)
        # The host lets the partition go on its own schedule (its fds, the
        # mapping of guest RAM); each fd must be closed within the deadline,
        # none may stay for good (as the RAM memfd did while a connection
        # still held its rings).  At most ``before``: an admin connection
        # answered just before that count may have been lingering in it.
        wait_for(lambda: host.inspect()["open_fds"] <= before)
        assert not os.path.exists(f"{host.socket}.vsock.1")


def test_hostile_pipe_packets_reset_their_connection_only(tmp_path: Path) -> None:
    with tcp_server(EchoHandler) as port, sockets_host(tmp_path, {ECHO_PORT: f"tcp:127.0.0.1:{port}"}) as host:
        (result,) = run_program(host, "hostile_pipe", str(ECHO_PORT))
        assert result["outcome"] == {name: "reset" for name in
                                     ("length_past_packet", "over_16k", "partial", "gpa_direct_setup")}
        assert result["after"] == "enif"


def test_a_guest_that_exits_right_after_its_reply_loses_none_of_it_to_a_slow_host_reader(tmp_path: Path) -> None:
    """The guest program sends 2 MiB, closes the stream and returns at once;
    the host program reads 32 KiB every 10 ms, so most of the reply is still
    in the connection's ring or the host's hands when the guest shuts down.
    The guest's shutdown must wait for the host to relay it all (and rescind)
    before it closes the channel, which would take the rest with it."""
    with sockets_host(tmp_path, {}) as host:
        proc = subprocess.Popen(guest_command(host, f"{PROGRAMS}:listen_upper", str(LISTEN_PORT), "1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"listening": True}
            path = wait_for(lambda: device_state(host)["socket"])
            payload = os.urandom(1 << 20).hex().encode()
            client = UnixClient(path, LISTEN_PORT)
            assert client.answer.startswith("OK ")
            client.sock.sendall(payload)
            client.sock.shutdown(socket.SHUT_WR)
            h, count = hashlib.sha256(), 0
            while more := client.sock.recv(32 << 10):
                h.update(more)
                count += len(more)
                time.sleep(0.01)
            client.sock.close()
            assert (count, h.hexdigest()) == (len(payload), hashlib.sha256(payload.upper()).hexdigest())
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        host.settled(0)
