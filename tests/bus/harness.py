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
from typing import Any

import trio

from guest_kernel.hypercalls import Hypercalls
from guest_kernel.memory import GuestRam
from guest_kernel.synic import SynIC
from ring import Doorbell
from vmbus import hv
from vmbus import protocol as P

PVBUS = [sys.executable, "-m", "pvbus"]


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


@contextmanager
def host_process(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[HostProcess]:
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
            rc = proc.wait(timeout=15)
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

    async def expect(self, cls: type[P.Message], timeout: float = 5.0) -> P.Message:
        with trio.fail_after(timeout):
            while True:
                for i, m in enumerate(self.messages):
                    if isinstance(m, cls):
                        return self.messages.pop(i)
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
