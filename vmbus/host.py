"""The host service: accepts guests, runs a partition per guest.

``HostService.run`` listens on an AF_UNIX SOCK_SEQPACKET socket.  Each
connecting guest becomes a ``Partition`` with its own nursery: one task
answers its exits, one task per open channel runs the device's worker.
The first datagram must be CONNECT carrying the guest's RAM memfd
(sealed against shrinking, or refused) and its SINT eventfd.  When the
guest disconnects or dies, the nursery is cancelled and every task,
mapping and descriptor of that partition is released; other partitions
never notice.

An admin socket (``<socket>.admin``, AF_UNIX stream, one JSON request per
line) serves ``pvbus inspect`` and hot-remove: ``{"cmd": "inspect"}``,
``{"cmd": "rescind", "partition": N, "relid": R}``, and
``{"cmd": "wait", "partitions": N}`` (answers once N guests are connected).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from . import hv
from .device import DeviceSpec
from .guest_memory import GuestMemory, GuestMemoryError
from .hypervisor import Partition
from .server import HOST_VERSIONS, VmbusServer
from .transport import (
    CONNECT_BODY, KIND, STATUS, ExitKind, Truncated, fd_kind, is_eventfd, recv_msg, release_fds, send_msg,
)

log = logging.getLogger(__name__)


class HostService:
    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        devices: Iterable[DeviceSpec],
        *,
        versions: Iterable[int] = HOST_VERSIONS,
        device_config: dict[str, dict[str, Any]] | None = None,
        emulated_disks: bool = False,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.emulated_disks = emulated_disks
        self.admin_path = Path(f"{self.socket_path}.admin")
        self.devices = list(devices)
        self.versions = tuple(versions)
        self.device_config = device_config or {}
        self.partitions: dict[int, tuple[Partition, VmbusServer]] = {}
        self.rejected_connects = 0
        self._ids = itertools.count(1)
        self._changed = trio.Event()  # set whenever a partition comes or goes

    def _partitions_changed(self) -> None:
        ev, self._changed = self._changed, trio.Event()
        ev.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        admin = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for path in (self.socket_path, self.admin_path):
            path.unlink(missing_ok=True)
        try:
            await listener.bind(str(self.socket_path))
            listener.listen(64)
            await admin.bind(str(self.admin_path))
            admin.listen(8)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_admin, admin, nursery)
                task_status.started()
                log.info("host listening on %s", self.socket_path)
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._guest, sock)
        finally:
            listener.close()
            admin.close()
            for path in (self.socket_path, self.admin_path):
                path.unlink(missing_ok=True)

    async def _guest(self, sock: trio.socket.SocketType) -> None:
        """One guest from connect to release.  Whatever goes wrong in it ends
        this partition only: the service and every other guest carry on."""
        try:
            await self._run_guest(sock)
        except Exception:  # noqa: BLE001 - isolation between guests is the point
            log.exception("a partition failed; it was released, the host goes on")

    async def _run_guest(self, sock: trio.socket.SocketType) -> None:
        partition = await self._connect(sock)
        if partition is None:
            release_fds([sock.detach()])  # its queue may hold more of the guest's fds
            return
        server: VmbusServer | None = None
        models: list[Any] = []
        try:
            await send_msg(sock, STATUS.pack(hv.HvStatus.SUCCESS))
            models = self._attach_emulated(partition)
            async with trio.open_nursery() as nursery:
                server = VmbusServer(partition, self.devices, nursery, self.versions, self.device_config)
                self.partitions[partition.id] = (partition, server)
                self._partitions_changed()
                log.info("partition %d: guest connected (%d MiB RAM)", partition.id, partition.memory.size >> 20)
                try:
                    await partition.serve()
                except OSError as exc:
                    log.info("partition %d: control socket error: %s", partition.id, exc)
                nursery.cancel_scope.cancel()  # guest gone: stop every channel worker
        finally:
            self.partitions.pop(partition.id, None)
            with trio.CancelScope(shield=True):
                if server is not None:
                    await server.close()
                for disk in models:
                    disk.close()
                await partition.aclose()
            self._partitions_changed()
            log.info("partition %d: released", partition.id)

    def _attach_emulated(self, partition: Partition) -> list[Any]:
        """The emulated IDE and DMA controllers on the storage image, for the
        full-virtualization and emulation comparisons; returns what to close."""
        cfg = self.device_config.get("storage")
        if not self.emulated_disks or not cfg:
            return []
        from host_drivers.emulated import DMA_BASE, DMA_REGS, IDE_BASE, IDE_PORTS
        from host_drivers.emulated.dma import DmaDisk
        from host_drivers.emulated.ide import IdePio
        from host_drivers.storage.backend import DiskImage

        disks = [DiskImage(cfg["path"], read_only=bool(cfg.get("read_only"))) for _ in range(2)]
        partition.io_regions = [(IDE_BASE, IDE_PORTS, IdePio(disks[0])), (DMA_BASE, DMA_REGS, DmaDisk(disks[1], partition))]
        return disks

    async def _connect(self, sock: trio.socket.SocketType) -> Partition | None:
        """The CONNECT exit: RAM and SINT fds, each checked for what it is before
        it is used (a memfd sealed against shrinking, an eventfd); anything
        else is refused, its fds released off the loop (``release_fds``).
        The caller answers SUCCESS once it owns the partition."""
        try:
            data, fds = await recv_msg(sock)
        except (Truncated, OSError):
            self.rejected_connects += 1
            return None
        memory = None
        try:
            if len(fds) != 2 or len(data) != KIND.size + CONNECT_BODY.size or KIND.unpack_from(data)[0] != ExitKind.CONNECT:
                raise ValueError("first exit must be CONNECT with RAM and SINT fds")
            (ram_size,) = CONNECT_BODY.unpack_from(data, KIND.size)
            if ram_size > 1 << 40:
                raise ValueError(f"RAM size {ram_size} too large")
            if not is_eventfd(fds[1]):
                raise ValueError(f"the SINT fd is {fd_kind(fds[1]) or 'unknown'}, not an eventfd")
            memory = GuestMemory(fds[0], ram_size)  # refuses anything but a memfd sealed against shrinking
        except (ValueError, GuestMemoryError, OSError) as exc:
            self.rejected_connects += 1
            log.warning("refused a guest: %s", exc)
            if memory is not None:
                memory.close()
                fds = fds[1:]
            release_fds(fds)
            try:
                await send_msg(sock, STATUS.pack(hv.HvStatus.INVALID_PARAMETER))
            except OSError:
                pass
            return None
        return Partition(next(self._ids), sock, memory, fds[1])

    # -- admin ---------------------------------------------------------------

    async def _accept_admin(self, admin: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            conn, _ = await admin.accept()
            nursery.start_soon(self._admin, trio.SocketStream(conn))

    async def _admin(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\n" not in buf and len(buf) < 65536:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
            try:
                req = json.loads(buf.split(b"\n", 1)[0])
                if req.get("cmd") == "wait":
                    reply = await self.wait_partitions(int(req["partitions"]), float(req.get("timeout", 30)))
                else:
                    reply = self.admin_command(req)
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": str(exc)}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def wait_partitions(self, count: int, timeout: float) -> dict[str, Any]:
        """Return once exactly ``count`` partitions exist (admin ``wait``)."""
        with trio.move_on_after(timeout):
            while len(self.partitions) != count:
                await self._changed.wait()
        return {"ok": len(self.partitions) == count, "partitions": len(self.partitions)}

    def admin_command(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "inspect":
            return {"ok": True, **self.inspect()}
        if cmd == "rescind":
            partition, server = self.partitions[int(req["partition"])]
            server.rescind(int(req["relid"]))
            return {"ok": True}
        raise ValueError(f"unknown command {cmd!r}")

    def inspect(self) -> dict[str, Any]:
        import psutil

        me = psutil.Process()
        return {
            "pid": me.pid,
            "resident_bytes": me.memory_info().rss,
            "open_fds": me.num_fds(),
            "rejected_connects": self.rejected_connects,
            "devices": [d.name for d in self.devices],
            "partitions": [
                {**partition.snapshot(), **server.snapshot()} for partition, server in self.partitions.values()
            ],
        }


async def admin_request(socket_path: str | os.PathLike[str], request: dict[str, Any]) -> dict[str, Any]:
    """Send one admin request to a running host (``pvbus inspect`` uses this)."""
    stream = await trio.open_unix_socket(f"{socket_path}.admin")
    async with stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)
