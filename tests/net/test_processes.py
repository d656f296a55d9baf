"""The NIC between real processes and real Linux stacks at both ends: a
host process (TAP or switch backend) and guest processes whose eth0 lives
in a network namespace the test made; ping, TCP, HTTP and jumbo frames go
through the kernels' own stacks, and a rescind takes the guest's link down.

Needs root, /dev/net/tun and network namespaces (skipped, with the reason,
elsewhere); every namespace is created and removed here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.bus.harness import PVBUS, HostProcess, host_process
from tests.net.helpers import need_network_privileges, netns

pytestmark = pytest.mark.timeout(120)

GUEST_PROGRAM = '''
import json


async def hold(kernel, argv):
    nic = kernel.device("net")
    print(json.dumps({"mac": nic.mac.hex(":"), "mtu": nic.mtu, "netns": nic.netns}), flush=True)
    import trio
    await trio.sleep_forever()
'''


@pytest.fixture(autouse=True)
def _privileges() -> None:
    need_network_privileges()


@contextmanager
def guest(tmp_path: Path, host: HostProcess, guest_ns: str, *args: str) -> Iterator[dict[str, Any]]:
    """A guest process whose NIC is eth0 in ``guest_ns``; yields what it printed."""
    (tmp_path / "netprog.py").write_text(GUEST_PROGRAM)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    cmd = [*PVBUS, "guest", "--socket", host.socket, "--ram", "64", "--program", "netprog:hold",
           "--netns", guest_ns, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("{"):
            proc.kill()
            raise AssertionError(f"guest did not start: {line!r} {proc.communicate()[1].decode()[-2000:]}")
        info = json.loads(line)
        info["process"] = proc
        yield info
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.communicate()[1].decode()[-2000:]  # a clean shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def in_ns(ns: str, *cmd: str, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout, **kw)


def python_in(ns: str, code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return in_ns(ns, sys.executable, "-c", code, *args, timeout=timeout)


def eventually(check: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.1)


@contextmanager
def tap_pair(tmp_path: Path, mtu: int = 1500) -> Iterator[tuple[HostProcess, str, str, dict[str, Any]]]:
    """A host whose NIC backend is TAP ``pvt0`` (10.77.0.1/24) in a host
    namespace, and one guest at 10.77.0.2/24 in a guest namespace."""
    with ExitStack() as stack:
        host_ns = stack.enter_context(netns("pvh"))
        guest_ns = stack.enter_context(netns("pvg"))
        device = f"net:backend=tap,ifname=pvt0,netns={host_ns},address=10.77.0.1/24,mtu={mtu}"
        host = stack.enter_context(host_process(tmp_path, "--device", device))
        info = stack.enter_context(guest(tmp_path, host, guest_ns, "--ip", "10.77.0.2/24", "--gateway", "10.77.0.1"))
        yield host, host_ns, guest_ns, info


ECHO_SERVER = '''
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7007)); s.listen(1); print("listening", flush=True)
c, _ = s.accept()
while data := c.recv(65536):
    c.sendall(data)
'''

ECHO_CLIENT = '''
import hashlib, os, socket, sys
payload = os.urandom(1 << 20)
c = socket.create_connection((sys.argv[1], 7007), timeout=20)
c.sendall(payload); c.shutdown(socket.SHUT_WR)
got = b""
while data := c.recv(65536):
    got += data
print(hashlib.sha256(payload).hexdigest(), hashlib.sha256(got).hexdigest(), len(got))
'''


def test_ping_and_tcp_echo_between_guest_and_host_tap(tmp_path: Path) -> None:
    with tap_pair(tmp_path) as (host, host_ns, guest_ns, info):
        assert info["mtu"] == 1500 and info["netns"] == guest_ns
        link = in_ns(guest_ns, "ip", "-j", "link", "show", "eth0")
        assert json.loads(link.stdout)[0]["address"] == info["mac"]
        ping = in_ns(host_ns, "ping", "-c", "3", "-i", "0.2", "-W", "5", "10.77.0.2")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert " 0% packet loss" in ping.stdout
        server = subprocess.Popen(["ip", "netns", "exec", guest_ns, sys.executable, "-c", ECHO_SERVER],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "listening"
            client = python_in(host_ns, ECHO_CLIENT, "10.77.0.2")
            sent, got, length = client.stdout.split()
            assert sent == got and int(length) == 1 << 20, client.stderr
        finally:
            server.kill()
            server.wait()
        nic = next(ch["device_state"] for p in host.inspect()["partitions"] for ch in p["channels"]
                   if ch["device"] == "net")
        assert nic["backend"] == "tap" and nic["rx"]["bytes"] > 1 << 20 and nic["tx"]["bytes"] > 1 << 20


HTTP_CLIENT = '''
import hashlib, sys, urllib.request
body = urllib.request.urlopen(f"http://{sys.argv[1]}:8080/blob", timeout=20).read()
print(hashlib.sha256(body).hexdigest(), len(body))
'''


def test_http_get_from_inside_the_guest_to_a_host_server(tmp_path: Path) -> None:
    with tap_pair(tmp_path) as (_host, host_ns, guest_ns, _info):
        root = tmp_path / "www"
        root.mkdir()
        blob = os.urandom(300_000)
        (root / "blob").write_bytes(blob)
        server = subprocess.Popen(["ip", "netns", "exec", host_ns, sys.executable, "-m", "http.server", "8080",
                                   "--bind", "10.77.0.1", "--directory", str(root)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def answered() -> bool:
                return in_ns(host_ns, "python3", "-c", "import socket; socket.create_connection(('10.77.0.1', 8080), 1)"
                             ).returncode == 0
            eventually(answered, "the HTTP server listens")
            got = python_in(guest_ns, HTTP_CLIENT, "10.77.0.1")
            import hashlib

            assert got.stdout.split() == [hashlib.sha256(blob).hexdigest(), str(len(blob))], got.stderr
        finally:
            server.kill()
            server.wait()


def test_jumbo_and_minimum_size_frames_through_real_stacks(tmp_path: Path) -> None:
    with tap_pair(tmp_path, mtu=9000) as (_host, host_ns, guest_ns, info):
        assert info["mtu"] == 9000
        mtu = json.loads(in_ns(guest_ns, "ip", "-j", "link", "show", "eth0").stdout)[0]["mtu"]
        assert mtu == 9000
        # 8972 bytes of ICMP payload + 8 + 20 = 9000: one unfragmented jumbo frame each way.
        jumbo = in_ns(host_ns, "ping", "-c", "2", "-W", "5", "-M", "do", "-s", "8972", "10.77.0.2")
        assert jumbo.returncode == 0, jumbo.stdout + jumbo.stderr
        # An empty ICMP echo: a 42-byte frame, under Ethernet's 60-byte minimum (TAP does not pad).
        tiny = in_ns(guest_ns, "ping", "-c", "2", "-W", "5", "-s", "0", "10.77.0.1")
        assert tiny.returncode == 0, tiny.stdout + tiny.stderr
        too_big = in_ns(host_ns, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "8973", "10.77.0.2")
        assert too_big.returncode != 0


def test_rescind_takes_the_guests_link_down_without_a_hang(tmp_path: Path) -> None:
    with tap_pair(tmp_path) as (host, _host_ns, guest_ns, info):
        def state() -> str:
            out = in_ns(guest_ns, "ip", "-j", "link", "show", "eth0")
            return str(json.loads(out.stdout)[0]["operstate"]) if out.returncode == 0 else "gone"
        eventually(lambda: state() == "UNKNOWN" or state() == "UP", "eth0 is up")
        part = next(p for p in host.inspect()["partitions"])
        relid = next(ch["relid"] for ch in part["channels"] if ch["device"] == "net")
        assert host.admin({"cmd": "rescind", "partition": part["id"], "relid": relid})["ok"]
        eventually(lambda: state() in ("DOWN", "gone"), "eth0 goes down after the rescind")
        proc = info["process"]
        assert proc.poll() is None  # the guest runs on without its NIC
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_two_guests_on_one_switch_reach_each_other(tmp_path: Path) -> None:
    with ExitStack() as stack:
        ns_a = stack.enter_context(netns("pva"))
        ns_b = stack.enter_context(netns("pvb"))
        host = stack.enter_context(host_process(tmp_path, "--device", "net:backend=switch,switch=lab"))
        a = stack.enter_context(guest(tmp_path, host, ns_a, "--ip", "10.78.0.1/24"))
        b = stack.enter_context(guest(tmp_path, host, ns_b, "--ip", "10.78.0.2/24"))
        assert a["mac"] != b["mac"]
        ping = in_ns(ns_a, "ping", "-c", "3", "-i", "0.2", "-W", "5", "10.78.0.2")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        server = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", ECHO_SERVER],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "listening"
            client = python_in(ns_a, ECHO_CLIENT, "10.78.0.2")
            sent, got, length = client.stdout.split()
            assert sent == got and int(length) == 1 << 20, client.stderr
        finally:
            server.kill()
            server.wait()
        ports = [ch["device_state"] for p in host.inspect()["partitions"] for ch in p["channels"]
                 if ch["device"] == "net"]
        assert [p["backend"] for p in ports] == ["switch", "switch"] and ports[0]["learned_macs"] == 2
