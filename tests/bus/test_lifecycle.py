"""Rescind under load, a guest killed mid-traffic, and what an idle guest costs."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from guest_kernel.kernel import GuestKernel
from vmbus.device import load_devices
from vmbus.errors import ChannelRevoked
from vmbus.host import admin_request

from .harness import SINK_MODULE, env_with, guest_command, host_process, install_plugin


def test_rescind_open_device_with_requests_in_flight(tmp_path: Path) -> None:
    """Two devices under load: echo (answers) and sink (holds every request,
    so some are surely in flight).  Rescinding both wakes every waiter with
    ChannelRevoked, never a hang; the guest releases the relids and goes on."""
    site = install_plugin(tmp_path, "sink", SINK_MODULE)
    # only the two devices rescinded below: the test waits for the host to have no channel left
    with host_process(tmp_path, "--device", "echo", "--device", "sink", env=env_with(site)) as host:

        async def scenario() -> None:
            kernel = GuestKernel(load_devices(), ram_size=16 << 20)
            outcomes: list[str] = []
            try:
                async with trio.open_nursery() as nursery:
                    await kernel.boot(host.socket, nursery)
                    echo, sink = kernel.device("echo"), kernel.device("sink")
                    started = trio.Event()

                    async def hammer(k: int) -> None:
                        try:
                            i = 0
                            while True:
                                assert await echo.echo(b"%d-%d" % (k, i)) == b"%d-%d" % (k, i)
                                i += 1
                                if i == 20:
                                    started.set()
                        except ChannelRevoked:
                            outcomes.append("echo revoked")

                    async def held(k: int) -> None:
                        try:
                            await sink.requests.request(b"never answered %d" % k)
                        except ChannelRevoked:
                            outcomes.append("sink revoked")

                    async with trio.open_nursery() as workers:
                        for k in range(8):
                            workers.start_soon(hammer, k)
                            workers.start_soon(held, k)
                        await started.wait()
                        assert sink.channel.stats.packets_sent == 8  # all held requests are out
                        snap = await admin_request(host.socket, {"cmd": "inspect"})
                        pid = snap["partitions"][0]["id"]
                        relids = {c["device"]: c["relid"] for c in snap["partitions"][0]["channels"]}
                        with trio.fail_after(30):  # a rescind must never hang its users
                            for name in ("echo", "sink"):
                                req = {"cmd": "rescind", "partition": pid, "relid": relids[name]}
                                assert (await admin_request(host.socket, req))["ok"]
                    assert sorted(outcomes) == ["echo revoked"] * 8 + ["sink revoked"] * 8
                    assert sink.requests.failed_in_flight == 8
                    for name in ("echo", "sink"):
                        with pytest.raises(ChannelRevoked):
                            kernel.device(name)
                    # the guest released the relids: the host forgot the channels
                    with trio.fail_after(30):
                        while (await admin_request(host.socket, {"cmd": "inspect"}))["partitions"][0]["channels"]:
                            await trio.sleep(0.01)
                    await kernel.shutdown()
                    nursery.cancel_scope.cancel()
            finally:
                kernel.close()

        trio.run(scenario)


def _progress(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "guest stopped reporting"
    return int(json.loads(line)["echoes"])


def _advances(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the guest's echo count grows within about 30 s of reports (one
    every 0.2 s): a starved guest may report the same count a few times."""
    first = _progress(proc)
    return any(_progress(proc) > first for _ in range(150))


def test_guest_killed_mid_traffic_releases_everything(tmp_path: Path) -> None:
    with host_process(tmp_path) as host:
        survivors = [subprocess.Popen(guest_command(host, "echo-load", "4"), stdout=subprocess.PIPE)
                     for _ in range(2)]
        try:
            for p in survivors:
                assert _progress(p) >= 0
            assert host.admin({"cmd": "wait", "partitions": 2})["ok"]
            before = host.inspect()["open_fds"]
            victim = subprocess.Popen(guest_command(host, "echo-load", "4"), stdout=subprocess.PIPE)
            assert _advances(victim)  # traffic is flowing
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            assert host.admin({"cmd": "wait", "partitions": 2})["ok"]
            # The host closes a gone guest's fds off its event loop: eventually.
            # At most ``before``, not exactly: an admin connection answered just
            # before that count may still have been lingering in it (the host
            # reads a client's leftovers for up to a second after answering).
            deadline = time.monotonic() + 30
            while host.inspect()["open_fds"] > before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert host.inspect()["open_fds"] <= before
            for p in survivors:  # the others never noticed
                assert _advances(p)
        finally:
            for p in survivors:
                p.send_signal(signal.SIGTERM)
            codes = [p.wait(timeout=30) for p in survivors]
        assert codes == [0, 0]
        assert host.admin({"cmd": "wait", "partitions": 0})["ok"]


def test_idle_guest_host_memory(tmp_path: Path) -> None:
    """Eight idle guests cost the host at most 5 MiB of resident memory each,
    beyond the guest RAM pages it touched (rings, SynIC pages)."""
    with host_process(tmp_path) as host:
        base = host.inspect()["resident_bytes"]
        guests = [subprocess.Popen(guest_command(host, "idle", ram=256), stdout=subprocess.PIPE) for _ in range(8)]
        try:
            for g in guests:
                assert g.stdout is not None and json.loads(g.stdout.readline())["booted"]
            assert host.admin({"cmd": "wait", "partitions": 8})["ok"]
            per_guest = (host.inspect()["resident_bytes"] - base) / 8
            print(f"host resident memory per idle guest: {per_guest / 1024:.0f} KiB")
            assert per_guest <= 5 << 20
        finally:
            for g in guests:
                g.send_signal(signal.SIGTERM)
            assert [g.wait(timeout=30) for g in guests] == [0] * 8
