"""The host service: accepts guests, runs a partition per guest.

``HostService.run`` listens on an AF_UNIX SOCK_SEQPACKET socket.  Each
connecting guest becomes a ``Partition`` with its own nursery: one task
answers its exits, one task per open channel runs the device's worker.
The first datagram must be CONNECT carrying the guest's RAM memfd
(sealed against shrinking, or refused) and its SINT eventfd.  When the
guest disconnects or dies, the nursery is cancelled and every task,
mapping and descriptor of that partition is released; other partitions
never notice.

An admin socket (``<socket>.admin``) serves ``pvbus inspect``, hot-remove
and waiting for guests; its protocol is ``vmbus.admin``.  Both sockets are
created and guarded as ``vmbus.access`` describes: owner-only unless shared
with a group, peers checked by their credentials, a live socket never taken
over, only our own socket files removed.

A misbehaving guest costs one warning line naming its partition and the
reason; the traceback is logged at debug level only.  ``shutdown`` is the
host's goodbye: every offered channel is rescinded, the guests get a short
grace period to release them, then the caller cancels ``run``, which closes
every control socket.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from . import hv
from .access import Access, Listener, listen_unix
from .admin import AdminError, admin_request
from .admin import serve as serve_admin
from .device import DeviceCommandError, DeviceSpec
from .guest_memory import GuestMemory, GuestMemoryError
from .hypervisor import Partition
from .server import HOST_VERSIONS, Refused, VmbusServer
from .transport import (
    CONNECT_BODY,
    KIND,
    STATUS,
    ExitKind,
    Truncated,
    fd_kind,
    is_eventfd,
    recv_msg,
    release_fds,
    send_msg,
)
from .trapped import TrappedDeviceSpec, check_windows
from .trapped import attach as attach_trapped

log = logging.getLogger(__name__)
__all__ = ["HostService", "admin_request"]  # admin_request lives in vmbus.admin; callers reach it here too
SHUTDOWN_GRACE = 2.0  # seconds guests get to release rescinded channels before their sockets close
GUEST_BACKLOG = 64
ADMIN_BACKLOG = 64  # the kernel's queue, not the host's: bursts of clients wait there


class HostService:
    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        devices: Iterable[DeviceSpec],
        *,
        versions: Iterable[int] = HOST_VERSIONS,
        device_config: dict[str, dict[str, Any]] | None = None,
        trapped: Iterable[tuple[TrappedDeviceSpec, dict[str, Any]]] = (),
        group: str | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.group = group
        self.access: Access | None = None
        self._listeners: tuple[Listener, Listener] | None = None
        self.trapped = list(trapped)
        check_windows(spec for spec, _ in self.trapped)
        self.admin_path = Path(f"{self.socket_path}.admin")
        self.devices = list(devices)
        self.versions = tuple(versions)
        self.device_config = device_config or {}
        self.partitions: dict[int, tuple[Partition, VmbusServer]] = {}
        self.rejected_connects = 0
        self._ids = itertools.count(1)
        self._changed = trio.Event()  # set whenever a partition comes or goes
        self._releasing: set[int] = set()  # partitions gone from the table, still returning what they held

    def _partitions_changed(self) -> None:
        ev, self._changed = self._changed, trio.Event()
        ev.set()

    def bind(self) -> None:
        """Create the guest and admin sockets (``HostSocketError`` in words if
        the path is in use, is not a socket or cannot be created).  ``run``
        calls it if the caller did not; calling it first lets a command
        report the problem before anything starts."""
        if self._listeners is not None:
            return
        self.access = Access.for_group(self.group)
        guests = listen_unix(self.socket_path, socket.SOCK_SEQPACKET, self.access, GUEST_BACKLOG)
        try:
            admin = listen_unix(self.admin_path, socket.SOCK_STREAM, self.access, ADMIN_BACKLOG)
        except BaseException:
            guests.close()
            raise
        self._listeners = guests, admin

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.bind()
        assert self._listeners is not None and self.access is not None
        guests, admin = self._listeners
        access = self.access
        try:
            listener = trio.socket.from_stdlib_socket(guests.sock)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_admin, trio.socket.from_stdlib_socket(admin.sock), self,
                                    lambda conn: access.admits(conn, "admin socket"))
                task_status.started()
                log.info("host listening on %s (%s may connect)", self.socket_path, access.describe())
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as exc:  # out of fds, say: wait a little rather than spin or die
                        log.warning("guest socket: accept failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    if not access.admits(sock, "guest socket"):
                        sock.close()
                        continue
                    nursery.start_soon(self._guest, sock)
        finally:
            self._listeners = None
            for each in (guests, admin):
                each.close()

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Tell every guest the host is going: rescind every channel it was
        offered and wait up to ``grace`` seconds for the guests to release them
        (or leave).  Then cancel ``run``: that closes every control socket."""
        for _, server in self.partitions.values():
            server.rescind_all()
        with trio.move_on_after(grace):
            # Polled: a release is a guest message with no event of its own,
            # and this runs once, for at most ``grace``.
            while any(server.offers_sent and server.channels for _, server in self.partitions.values()):
                await trio.sleep(0.02)

    async def _guest(self, sock: trio.socket.SocketType) -> None:
        """One guest from connect to release.  Whatever goes wrong in it ends
        this partition only: the service and every other guest carry on."""
        try:
            await self._run_guest(sock)
        except Exception as exc:  # noqa: BLE001 - isolation between guests is the point
            log.warning("a connecting guest failed: %s", failure_reason(exc))
            log.debug("a connecting guest failed", exc_info=True)

    async def _run_guest(self, sock: trio.socket.SocketType) -> None:
        partition = await self._connect(sock)
        if partition is None:
            release_fds([sock.detach()])  # its queue may hold more of the guest's fds
            return
        server: VmbusServer | None = None
        models: list[Any] = []
        try:
            await send_msg(sock, STATUS.pack(hv.HvStatus.SUCCESS))
            models = attach_trapped(partition, self.trapped)
            async with trio.open_nursery() as nursery:
                server = VmbusServer(partition, self.devices, nursery, self.versions, self.device_config,
                                     host_socket=str(self.socket_path), access=self.access)
                self.partitions[partition.id] = (partition, server)
                self._partitions_changed()
                log.info("partition %d: guest connected (%d MiB RAM)", partition.id, partition.memory.size >> 20)
                try:
                    await partition.serve()
                except OSError as exc:
                    log.info("partition %d: control socket error: %s", partition.id, exc)
                nursery.cancel_scope.cancel()  # guest gone: stop every channel worker
        except Exception as exc:  # noqa: BLE001 - one line per misbehaving guest; the rest at debug level
            log.warning("partition %d: failed, releasing it (the host goes on): %s", partition.id, failure_reason(exc))
            log.debug("partition %d failed", partition.id, exc_info=True)
        finally:
            # Out of the table first (no admin request reaches it any more),
            # but counted as present until everything it held is returned:
            # ``wait`` answers only once the release is complete.
            self.partitions.pop(partition.id, None)
            self._releasing.add(partition.id)
            try:
                with trio.CancelScope(shield=True):
                    if server is not None:
                        await server.close()
                    for model in models:
                        model.close()
                    await partition.aclose()
            finally:
                self._releasing.discard(partition.id)
            self._partitions_changed()
            log.info("partition %d: released", partition.id)

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
            well_formed = len(data) == KIND.size + CONNECT_BODY.size and KIND.unpack_from(data)[0] == ExitKind.CONNECT
            if len(fds) != 2 or not well_formed:
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

    # -- admin (vmbus.admin.AdminHost) ------------------------------------------
    async def wait_partitions(self, count: int, timeout: float) -> dict[str, Any]:
        """Return once exactly ``count`` partitions exist (admin ``wait``)."""
        def present() -> int:
            return len(self.partitions) + len(self._releasing)

        with trio.move_on_after(timeout):
            while present() != count:
                await self._changed.wait()
        return {"ok": present() == count, "partitions": present()}

    def rescind(self, partition: int, relid: int) -> None:
        """Hot-remove channel ``relid`` of ``partition`` (admin ``rescind``)."""
        entry = self.partitions.get(partition)
        if entry is None:
            raise AdminError(f"no partition {partition}")
        try:
            entry[1].rescind(relid)
        except Refused as exc:
            raise AdminError(f"partition {partition}: {exc}") from None

    async def device_command(self, partition: int, device: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run ``command`` of ``device`` for one guest (admin ``device``): the
        bus only finds the device's host half; the device checks the rest."""
        entry = self.partitions.get(partition)
        if entry is None:
            raise AdminError(f"no partition {partition}")
        found = next((ch.device for ch in entry[1].channels.values() if ch.spec.name == device and not ch.sub_index),
                     None)
        if found is None:
            raise AdminError(f"partition {partition} has no device {device!r}")
        try:
            return await found.admin(command, args)
        except DeviceCommandError as exc:
            raise AdminError(f"partition {partition}, {device}: {exc}") from None

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


def failure_reason(exc: BaseException) -> str:
    """What went wrong, in one line: each exception inside trio's groups as
    its type and message."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(failure_reason(inner) for inner in exc.exceptions)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
