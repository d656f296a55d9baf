"""Real processes for bus tests: a host subprocess, guest subprocesses, and a
raw guest that speaks exits directly (for hostile input)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from guest_kernel.hypercalls import Hypercalls
from guest_kernel.memory import GuestRam
from guest_kernel.synic import SynIC
from ring import Doorbell
from vmbus import hv
from vmbus import protocol as P

PVBUS = [sys.executable, "-m", "pvbus"]
M = TypeVar("M", bound=P.Message)


class HostProcess:
    def __init__(self, proc: subprocess.Popen[bytes], socket_path: str) -> None:
        self.proc = proc
        self.socket = socket_path

    def inspect(self) -> dict[str, Any]:
        from vmbus.host import admin_request

        return trio.run(admin_request, self.socket, {"cmd": "inspect"})

    def admin(self, request: dict[str, Any]) -> dict[str, Any]:
        from vmbus.host import admin_request

        return trio.run(admin_request, self.socket, request)

    def settled(self, partitions: int = 0) -> dict[str, Any]:
        """The host's snapshot once exactly ``partitions`` guests remain (the
        host notices a guest's exit on its own schedule; up to 30 s)."""
        assert self.admin({"cmd": "wait", "partitions": partitions})["ok"], "guests were not released"
        return self.inspect()


@contextmanager
def host_process(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[HostProcess]:
    """A ``pvbus host`` subprocess, stopped with SIGTERM (and required to exit 0)."""
    sock = str(tmp_path / "host.sock")
    proc = subprocess.Popen([*PVBUS, "host", "--socket", sock, *args], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("ready"), f"host did not start: {line!r}"
        yield HostProcess(proc, sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, f"host exited with {rc} on SIGTERM"


def guest_command(host: HostProcess, program: str, *argv: str, ram: int = 32, versions: str | None = None) -> list[str]:
    cmd = [*PVBUS, "guest", "--socket", host.socket, "--ram", str(ram), "--program", program]
    if versions:
        cmd += ["--versions", versions]
    return [*cmd, "--", *argv]


def run_guest(host: HostProcess, program: str, *argv: str, **kw: Any) -> tuple[int, list[dict[str, Any]], str]:
    env = kw.pop("env", None)
    res = subprocess.run(guest_command(host, program, *argv, **kw), capture_output=True, timeout=120, env=env)
    lines = [json.loads(x) for x in res.stdout.decode().splitlines() if x.startswith("{")]
    return res.returncode, lines, res.stderr.decode()


class RawGuest:
    """A guest that posts whatever bytes a test wants, using the real SynIC
    pieces to receive the host's answers."""

    def __init__(self, ram_mib: int = 16) -> None:
        self.ram = GuestRam(ram_mib << 20)
        self.messages: list[P.Message] = []
        self.raw: list[bytes] = []
        self._arrived = trio.Event()

    async def connect(self, socket_path: str, nursery: trio.Nursery) -> None:
        self.sint = Doorbell()
        self.hv = await Hypercalls.connect(socket_path, self.ram.fd, self.ram.size, self.sint.fileno())
        self.synic = SynIC(self.ram, self.hv, self.sint)
        self.synic.on_message = self._on_message
        await self.synic.enable()
        nursery.start_soon(self.synic.run)

    def _on_message(self, data: bytes) -> None:
        self.raw.append(data)
        self.messages.append(P.decode(data))
        ev, self._arrived = self._arrived, trio.Event()
        ev.set()

    async def post(self, msg: P.Message | bytes, conn: int = 4) -> int:
        data = msg if isinstance(msg, bytes) else msg.encode()
        return await self.hv.post_message(conn, data)

    async def expect(self, cls: type[M], timeout: float = 30.0) -> M:
        with trio.fail_after(timeout):
            while True:
                for i, m in enumerate(self.messages):
                    if isinstance(m, cls):
                        del self.messages[i]
                        return m
                await self._arrived.wait()

    async def contact(self, version: int = P.Version.WIN10_V5_3) -> None:
        assert await self.post(P.InitiateContact(version, 0, 2, 0, 0), 4) == hv.HvStatus.SUCCESS
        resp = await self.expect(P.VersionResponse)
        assert resp.version_supported == 1

    def close(self) -> None:
        self.hv.close()
        self.synic.close()
        self.ram.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


SINK_MODULE = '''
"""A device whose host half takes requests and never answers them."""
import uuid
from ring import PacketType
from vmbus.channel import Requestor
from vmbus.device import DeviceSpec, GuestDriver, HostDevice

class SinkHost(HostDevice):
    async def serve(self, channel, memory):
        while True:
            self.held = await channel.receive()

class SinkDriver(GuestDriver):
    def __init__(self, channel):
        super().__init__(channel)
        self.requests = Requestor(channel)
    async def start(self, nursery):
        nursery.start_soon(self.requests.run)
    async def stop(self):
        self.requests.fail_all()

SPEC = DeviceSpec("sink", uuid.UUID("0d6c2f0e-8a53-4c4b-9b1e-6f8b1d3e5a21"), SinkHost, SinkDriver, ring_pages=2)
'''


def install_plugin(tmp_path: Path, name: str, source: str) -> Path:
    """A distribution on disk exactly as an installer leaves it: the module
    plus a dist-info whose entry_points.txt registers a ``pvbus.devices``
    entry.  Put the returned folder on PYTHONPATH (or sys.path)."""
    import importlib

    site = tmp_path / "plugins"
    site.mkdir(exist_ok=True)
    (site / f"pvbus_{name}.py").write_text(source)
    info = site / f"pvbus_{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: pvbus-{name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[pvbus.devices]\n{name} = pvbus_{name}:SPEC\n")
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return site


def env_with(path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
