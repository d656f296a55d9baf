"""The sockets device's host half (hvsock-reference.md sections 3, 4, 8).

The guest opens the device's control channel at boot.  On it, a connect
request (the TL_CONNECT_REQUEST layout) names the guest's endpoint and a
service; the host connects to the host service the ``services`` option
forwards that port to, then offers the connection's own channel (service
GUID, endpoint GUID, hv_sock flags, ``is_for_guest_accept`` = 0) and
answers success; the guest opens the offer.  A port nobody serves, a
service that refuses, too many connections or requests at once: the answer
is STATUS_CONNECTION_REFUSED (or insufficient resources), and nothing is
offered.

Host programs reach a guest's listening port through a Unix socket per
guest, ``<host socket>.vsock.<partition id>`` (owner-only like the host's
other sockets, ``vmbus.access``): they write ``CONNECT <port>\\n`` and get
``OK <port>\\n`` once the guest has accepted (Firecracker's hybrid vsock
handshake); the host offers the channel with ``is_for_guest_accept`` = 1
and a fresh endpoint GUID.  A guest that does not accept within
``accept_timeout`` seconds (no listener, a full backlog) gets the offer
rescinded, and the host program sees the socket close without an OK.

What a guest sends is counted by kind in ``counters`` (``pvbus inspect``
shows them): malformed or unknown requests, refused ports, bad pipe
packets; none costs the host more than reading it.  Outstanding requests
are bounded (16, as OpenVMM), connections per guest by ``max_connections``.
"""

from __future__ import annotations

import collections
import logging
import uuid
from pathlib import Path
from typing import Any

import trio

from ring import Packet, PacketType, RingFull
from vmbus.access import HostSocketError, listen_unix
from vmbus.channel import Channel
from vmbus.device import HostDevice
from vmbus.guest_memory import GuestMemory
from vmbus.protocols import hvsock

from .connection import Connection
from .services import Target, parse_services

log = logging.getLogger(__name__)
MAX_REQUESTS_IN_FLIGHT = 16  # OpenVMM MAX_CONCURRENT_HVSOCK_REQUESTS
CONNECT_TIMEOUT = 5.0  # seconds to reach a host service, and for the guest to open its offer
HANDSHAKE_TIMEOUT = 5.0  # seconds a host program has to send its CONNECT line
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_ACCEPT_TIMEOUT = 2.0
HOST_BACKLOG = 64


class SocketsHost(HostDevice):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.services = parse_services(config.get("services", ""))
        self.listen = bool(config.get("listen", True))
        self.max_connections = int(config.get("max_connections", DEFAULT_MAX_CONNECTIONS))
        self.accept_timeout = float(config.get("accept_timeout", DEFAULT_ACCEPT_TIMEOUT))
        self.connections: set[Connection] = set()
        self.requests_in_flight = 0
        self._request_done = trio.Event()
        self.counters: collections.Counter[str] = collections.Counter()
        self.socket_path: Path | None = None

    def snapshot(self) -> dict[str, Any]:
        return {"services": {hvsock.describe(s): str(t) for s, t in self.services.items()},
                "socket": None if self.socket_path is None else str(self.socket_path),
                "connections": [c.snapshot() for c in self.connections], "counters": dict(self.counters)}

    def _count(self, what: str) -> None:
        self.counters[what] += 1

    def _finished(self, conn: Connection) -> None:
        self.connections.discard(conn)

    # -- the control channel --------------------------------------------------

    async def serve(self, channel: Channel, memory: GuestMemory) -> None:
        async with trio.open_nursery() as nursery:
            if self.listen and self.place is not None and self.place.host_socket:
                await nursery.start(self._listen_host_programs, channel)
            while True:
                for pkt in await channel.receive():
                    # At most 16 requests in flight: beyond that the control
                    # ring is not read, which bounds what a guest can start.
                    while self.requests_in_flight >= MAX_REQUESTS_IN_FLIGHT:
                        await self._request_done.wait()
                    self._on_request(channel, pkt, nursery)

    def _answer(self, channel: Channel, trans_id: int, body: bytes) -> None:
        """The completion of a request; never waits (a guest that does not
        read its control ring loses the answer, not the host's time)."""
        try:
            channel.outgoing.write(body, trans_id=trans_id, packet_type=PacketType.COMPLETION)
        except RingFull:
            self._count("answers_dropped_ring_full")
            return
        channel.commit_write()

    def _on_request(self, channel: Channel, pkt: Packet, nursery: trio.Nursery) -> None:
        if pkt.type != PacketType.DATA_INBAND or not pkt.completion_requested:
            self._count("bad_control_packets")
            return
        request = hvsock.parse_connect_request(pkt.payload)
        if request is None:
            self._count("bad_connect_requests")
            self._answer(channel, pkt.trans_id, hvsock.CONNECT_RESULT.pack(
                hvsock.OP_CONNECT_RESULT, 0, bytes(16), bytes(16), hvsock.STATUS_CONNECTION_REFUSED))
            return
        target = self.services.get(request.service)
        if target is None:
            self._count("refused_no_service")
            self._answer(channel, pkt.trans_id, hvsock.connect_result(request, hvsock.STATUS_CONNECTION_REFUSED))
            return
        if len(self.connections) >= self.max_connections:
            self._count("refused_too_many")
            self._answer(channel, pkt.trans_id, hvsock.connect_result(request, hvsock.STATUS_TOO_MANY))
            return
        self.requests_in_flight += 1
        nursery.start_soon(self._connect_for_guest, channel, pkt.trans_id, request, target)

    async def _connect_for_guest(self, channel: Channel, trans_id: int, request: hvsock.ConnectRequest,
                                 target: Target) -> None:
        try:
            conn = await self._reach_service(channel, trans_id, request, target)
        finally:
            self.requests_in_flight -= 1
            self._request_done.set()
            self._request_done = trio.Event()
        if conn is not None:
            await self._await_open(conn, CONNECT_TIMEOUT)

    async def _reach_service(self, channel: Channel, trans_id: int, request: hvsock.ConnectRequest,
                             target: Target) -> Connection | None:
        """Connect to the host service, offer the channel, answer the guest."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await target.connect()
        except (OSError, trio.TooSlowError) as exc:
            self._count("refused_by_service")
            log.info("%s (%s) refused a guest: %s", hvsock.describe(request.service), target, exc)
            self._answer(channel, trans_id, hvsock.connect_result(request, hvsock.STATUS_CONNECTION_REFUSED))
            return None
        conn = await self._offer(channel, stream, request.service, request.endpoint, for_guest_accept=False)
        status = hvsock.STATUS_SUCCESS if conn is not None else hvsock.STATUS_TOO_MANY
        self._answer(channel, trans_id, hvsock.connect_result(request, status))
        return conn

    async def _offer(self, channel: Channel, stream: trio.abc.HalfCloseableStream, service: uuid.UUID,
                     endpoint: uuid.UUID, *, for_guest_accept: bool, greeting: bytes = b"") -> Connection | None:
        """Offer a connection's channel; None (the stream closed) if the bus has no room."""
        assert channel.offer_channel is not None and channel.rescind_channel is not None
        conn = Connection(stream, service, endpoint, rescind=channel.rescind_channel, count=self._count,
                          greeting=greeting, finished=self._finished)
        relid = channel.offer_channel(service, endpoint, conn.serve, flags=hvsock.OFFER_FLAGS,
                                      user_defined=hvsock.user_defined(for_guest_accept))
        if relid is None:
            self._count("refused_no_relid")
            await conn.end()
            return None
        conn.relid = relid
        self.connections.add(conn)
        return conn

    async def _await_open(self, conn: Connection, timeout: float) -> None:
        try:
            opened = await conn.wait_open(timeout)
        finally:
            if not conn.opened.is_set():
                with trio.CancelScope(shield=True):
                    await conn.abandon()
        if not opened:
            log.info("channel %s (%s) was not opened by the guest in time; rescinded",
                     conn.relid, hvsock.describe(conn.service))

    # -- host programs connecting to guest ports -------------------------------

    async def _listen_host_programs(self, channel: Channel,
                                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import socket as stdlib_socket

        assert self.place is not None and self.place.host_socket is not None
        path = Path(f"{self.place.host_socket}.vsock.{self.place.partition}")
        try:
            listener = listen_unix(path, stdlib_socket.SOCK_STREAM, self.place.access, HOST_BACKLOG)
        except HostSocketError as exc:
            self._count("listen_failed")
            log.warning("partition %d: no socket for host programs: %s", self.place.partition, exc)
            task_status.started()
            return
        self.socket_path = path
        access = self.place.access
        try:
            sock = trio.socket.from_stdlib_socket(listener.sock)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as exc:
                        log.warning("%s: accept failed: %s", path, exc)
                        await trio.sleep(0.1)
                        continue
                    if access is not None and not access.admits(conn, str(path)):
                        conn.close()
                        continue
                    nursery.start_soon(self._host_program, channel, trio.SocketStream(conn))
        finally:
            self.socket_path = None
            listener.close()

    async def _host_program(self, channel: Channel, stream: trio.SocketStream) -> None:
        handed_over = False
        try:
            line = await read_line(stream, hvsock.MAX_CONNECT_LINE, HANDSHAKE_TIMEOUT)
            service = None if line is None else hvsock.parse_connect_line(line)
            if service is None:
                self._count("bad_connect_lines")
                return
            if len(self.connections) >= self.max_connections:
                self._count("refused_too_many")
                return
            endpoint = uuid.uuid4()
            port = hvsock.guid_to_port(service)
            answer = (str(endpoint.fields[0]) if port is not None else str(endpoint))
            handed_over = True
            conn = await self._offer(channel, stream, service, endpoint, for_guest_accept=True,
                                     greeting=f"OK {answer}\n".encode())
            if conn is not None:
                await self._await_open(conn, self.accept_timeout)
        finally:
            if not handed_over:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def close(self) -> None:
        for conn in list(self.connections):
            await conn.end()


async def read_line(stream: trio.SocketStream, limit: int, timeout: float) -> bytes | None:
    """One line of at most ``limit`` bytes, read a byte at a time so that
    nothing after it is consumed; None on EOF, overflow or timeout."""
    line = bytearray()
    with trio.move_on_after(timeout):
        while len(line) < limit:
            byte = await stream.receive_some(1)
            if not byte:
                return None
            if byte == b"\n":
                return bytes(line)
            line += byte
    return None
