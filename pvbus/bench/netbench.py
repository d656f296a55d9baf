"""``pvbus bench net``: TCP through the synthetic NIC beside a veth pair.

Two paths between two network namespaces, measured in one run:

- **pvbus**: a ``pvbus host`` whose NIC backend is a TAP in one namespace
  and a ``pvbus guest`` whose eth0 is in the other (every frame crosses
  the rings, both Python halves and two TAP interfaces);
- **veth**: a veth pair between two namespaces (the native/container case).

On each: TCP stream throughput both ways (``iperf3`` where installed, else a
built-in socket pump), and TCP request/response latency (one byte each way,
p50/p99, built in).  For the NIC it also records the guest's exits (its
hypercalls) and the frames in both directions during the stream, as
frames per exit, and the CPU seconds the host and guest processes spent
per GB moved.  Needs root, /dev/net/tun and network namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import trio

from ..errors import CommandError

PORT_STREAM, PORT_RR = 5201, 7011

PUMP_SERVER = '''
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept()
mode = sys.argv[3]
if mode == "sink":
    total, start = 0, None
    while data := c.recv(1 << 20):
        start = start or time.monotonic(); total += len(data)
    print(total * 8 / (time.monotonic() - start), flush=True)
elif mode == "source":
    buf = bytes(1 << 16); end = time.monotonic() + float(sys.argv[4])
    while time.monotonic() < end:
        c.sendall(buf)
    c.close()
else:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while b := c.recv(1):
        c.sendall(b)
'''

PUMP_CLIENT = '''
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
mode, seconds = sys.argv[3], float(sys.argv[4])
if mode == "send":
    buf = bytes(1 << 16); end = time.monotonic() + seconds
    while time.monotonic() < end:
        c.sendall(buf)
    c.close()
elif mode == "receive":
    total, start = 0, time.monotonic()
    while data := c.recv(1 << 20):
        total += len(data)
    print(total * 8 / (time.monotonic() - start))
else:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []; end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter(); c.sendall(b"x"); c.recv(1); lat.append(time.perf_counter() - t)
    lat.sort()
    print(json.dumps({"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
                      "transactions": len(lat)}))
'''


async def guest_stats(kernel: Any, argv: list[str]) -> int:
    """Guest program for the bench: the NIC's and the kernel's counters as
    one JSON line whenever the bench asks (a line on standard input)."""
    nic = kernel.device("net")
    print(json.dumps({"ready": True}), flush=True)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some(64):
        exits = sum(kernel.statistics()["exits"].values())
        print(json.dumps({"exits": exits, "frames": nic.counters["rx_frames"] + nic.counters["tx_frames"]}),
              flush=True)
    return 0


def _in(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@contextmanager
def _netns(prefix: str) -> Iterator[str]:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _stream(server_ns: str, client_ns: str, address: str, seconds: float, reverse: bool) -> float:
    """Bits per second from client to server (``reverse``: server to client)."""
    if shutil.which("iperf3"):
        server = subprocess.Popen(_in(server_ns, "iperf3", "-s", "-1", "-B", address, "-p", str(PORT_STREAM)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):
                out = subprocess.run(_in(client_ns, "iperf3", "-c", address, "-p", str(PORT_STREAM), "-t",
                                         str(seconds), "-J", *(["-R"] if reverse else [])),
                                     capture_output=True, text=True, timeout=seconds + 60)
                try:
                    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"])
                except (ValueError, KeyError):
                    time.sleep(0.1)  # the server was not listening yet (iperf3 says so in its JSON)
            raise CommandError(f"iperf3 failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        finally:
            server.kill()
            server.wait()
    mode = ("source", "receive") if reverse else ("sink", "send")
    pump = subprocess.Popen(_in(server_ns, sys.executable, "-c", PUMP_SERVER, address, str(PORT_STREAM), mode[0],
                                str(seconds)), stdout=subprocess.PIPE, text=True)
    try:
        assert pump.stdout is not None and pump.stdout.readline().strip() == "ready"
        client = subprocess.run(_in(client_ns, sys.executable, "-c", PUMP_CLIENT, address, str(PORT_STREAM), mode[1],
                                    str(seconds)), capture_output=True, text=True, timeout=seconds + 60)
        return float(client.stdout) if reverse else float(pump.stdout.readline())
    finally:
        pump.kill()
        pump.wait()


def _request_response(server_ns: str, client_ns: str, address: str, seconds: float) -> dict[str, float]:
    server = subprocess.Popen(_in(server_ns, sys.executable, "-c", PUMP_SERVER, address, str(PORT_RR), "echo"),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        out = subprocess.run(_in(client_ns, sys.executable, "-c", PUMP_CLIENT, address, str(PORT_RR), "rr",
                                 str(seconds)), capture_output=True, text=True, timeout=seconds + 60)
        return dict(json.loads(out.stdout))
    finally:
        server.kill()
        server.wait()


def _measure(server_ns: str, client_ns: str, address: str, seconds: float, probe: Any = None) -> dict[str, Any]:
    before = probe() if probe else None
    to_server = _stream(server_ns, client_ns, address, seconds, reverse=False)
    from_server = _stream(server_ns, client_ns, address, seconds, reverse=True)
    after = probe() if probe else None
    row: dict[str, Any] = {"stream_to_server_gbps": to_server / 1e9, "stream_from_server_gbps": from_server / 1e9,
                           "tcp_rr": _request_response(server_ns, client_ns, address, seconds)}
    if before and after:
        frames = after["frames"] - before["frames"]
        exits = after["exits"] - before["exits"]
        row.update(frames=frames, exits=exits, frames_per_exit=frames / exits if exits else None,
                   exits_per_frame=exits / frames if frames else None)
    return row


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run(seconds: float) -> dict[str, Any]:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        raise CommandError("pvbus bench net needs root and /dev/net/tun (it makes TAP interfaces and namespaces)")
    results: dict[str, Any] = {"seconds": seconds, "tool": "iperf3" if shutil.which("iperf3") else "socket pump"}
    with ExitStack() as stack:
        a, b = stack.enter_context(_netns("pvbench-a")), stack.enter_context(_netns("pvbench-b"))
        subprocess.run(["ip", "link", "add", "pvb0", "netns", a, "type", "veth", "peer", "pvb1", "netns", b],
                       check=True)
        for ns, dev, addr in ((a, "pvb0", "10.89.0.1/24"), (b, "pvb1", "10.89.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        results["veth"] = _measure(a, b, "10.89.0.1", seconds)
        results["pvbus"] = stack.enter_context(_pvbus_pair(seconds))
    v, p = results["veth"], results["pvbus"]
    results["ratios"] = {
        "stream_to_guest_vs_veth": p["stream_from_server_gbps"] / v["stream_from_server_gbps"],
        "stream_from_guest_vs_veth": p["stream_to_server_gbps"] / v["stream_to_server_gbps"],
        "tcp_rr_p50_vs_veth": p["tcp_rr"]["p50_us"] / v["tcp_rr"]["p50_us"],
    }
    results["offloads"] = "none (the NIC offers no checksum or segmentation offload yet)"
    return results


@contextmanager
def _pvbus_pair(seconds: float) -> Iterator[dict[str, Any]]:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pvbench-") as tmp:
        host_ns, guest_ns = stack.enter_context(_netns("pvbench-h")), stack.enter_context(_netns("pvbench-g"))
        sock = os.path.join(tmp, "host.sock")
        pvbus = [sys.executable, "-m", "pvbus"]
        device = f"net:backend=tap,ifname=pvbt0,netns={host_ns},address=10.88.0.1/24"
        host = subprocess.Popen([*pvbus, "host", "--socket", sock, "--device", device], stdout=subprocess.PIPE)
        guest: subprocess.Popen[str] | None = None
        try:
            assert host.stdout is not None
            if not host.stdout.readline().startswith(b"ready"):
                raise CommandError("the bench's host did not start")
            guest = subprocess.Popen([*pvbus, "guest", "--socket", sock, "--program",
                                      "pvbus.bench.netbench:guest_stats", "--netns", guest_ns, "--ip", "10.88.0.2/24"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert guest.stdout is not None and guest.stdin is not None
            if "ready" not in guest.stdout.readline():
                raise CommandError("the bench's guest did not start")

            def probe() -> dict[str, Any]:
                assert guest is not None and guest.stdin is not None and guest.stdout is not None
                guest.stdin.write("\n")
                guest.stdin.flush()
                return dict(json.loads(guest.stdout.readline()))

            cpu_before = _cpu_seconds(host.pid) + _cpu_seconds(guest.pid)
            row = _measure(host_ns, guest_ns, "10.88.0.1", seconds, probe)
            cpu = _cpu_seconds(host.pid) + _cpu_seconds(guest.pid) - cpu_before
            moved_gb = (row["stream_to_server_gbps"] + row["stream_from_server_gbps"]) * seconds / 8
            row["cpu_seconds_per_gb"] = cpu / moved_gb if moved_gb else None
            yield row
        finally:
            for proc in (guest, host):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()


def main(json_path: str | None, quick: bool) -> int:
    results = run(2.0 if quick else 8.0)
    v, p, r = results["veth"], results["pvbus"], results["ratios"]
    print(f"{'path':8} {'to guest Gbit/s':>16} {'from guest Gbit/s':>18} {'RR p50 us':>10} {'RR p99 us':>10}")
    for name, row in (("veth", v), ("pvbus", p)):
        print(f"{name:8} {row['stream_from_server_gbps']:16.3f} {row['stream_to_server_gbps']:18.3f} "
              f"{row['tcp_rr']['p50_us']:10.1f} {row['tcp_rr']['p99_us']:10.1f}")
    print(f"pvbus/veth: stream to guest {r['stream_to_guest_vs_veth']:.3f}x, from guest "
          f"{r['stream_from_guest_vs_veth']:.3f}x, RR p50 {r['tcp_rr_p50_vs_veth']:.2f}x; "
          f"exits per frame {p.get('exits_per_frame')}, frames per exit {p.get('frames_per_exit')} "
          f"({results['tool']}, offloads: {results['offloads']})")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0
