"""Wire format of the sockets device (Hyper-V sockets, hv_sock).

Every connection is a channel of its own that the host offers
(hvsock-reference.md section 1): the offer carries the TLNPI provider and
named-pipe flags, the service GUID in the interface slot, the endpoint GUID
in the instance slot, and ``HvsockUserDefinedParameters`` in its
user-defined area (``is_for_guest_accept`` = 1 for a connection the host
started).  A vsock port *P* is the GUID ``<P>-facb-11e6-bd58-64006a7986d3``
(section 2); ports above 0x7FFFFFFF and GUIDs of any other shape name no
port.

Data moves in pipe mode (vmbus-reference.md section 2.6): in-band packets
whose payload is ``{u32 pkt_type; u32 data_size}`` plus the data; a DATA
packet of size 0 is the FIN (half-close).  ``parse_pipe_packet`` checks what
a peer sends against the bytes present and the 16 KiB pipe maximum.

The guest's connect request: on Hyper-V it is the VMBus message
TL_CONNECT_REQUEST (21) and the refusal TL_CONNECT_RESULT (23).  Here the
same 40-byte request and 44-byte result ride the device's own control
channel (an in-band request with completion requested, the result as its
completion), so the bus stays free of any device's messages.
"""

from __future__ import annotations

import collections
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from ring import PacketType, RingFull

if TYPE_CHECKING:
    from vmbus.channel import Channel

INTERFACE_ID: Final = uuid.UUID("9d1f4c3a-6c53-4e0b-8f52-5a8d1b7c0e21")  # the control channel

# Offer flags (hyperv.h) and what OpenVMM sets on a socket offer (0x2011).
ENUMERATE_DEVICE_INTERFACE: Final = 0x1
NAMED_PIPE_MODE: Final = 0x10
TLNPI_PROVIDER_OFFER: Final = 0x2000
OFFER_FLAGS: Final = ENUMERATE_DEVICE_INTERFACE | NAMED_PIPE_MODE | TLNPI_PROVIDER_OFFER

# -- ports and GUIDs (hvsock-reference.md section 2) ---------------------------

TEMPLATE: Final = uuid.UUID("00000000-facb-11e6-bd58-64006a7986d3")
MAX_PORT: Final = 0x7FFFFFFF


def port_to_guid(port: int) -> uuid.UUID:
    """The service GUID of vsock port ``port`` (Data1 = port)."""
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"port {port} is outside 0..{MAX_PORT}")
    return uuid.UUID(bytes_le=struct.pack("<I", port) + TEMPLATE.bytes_le[4:])


def guid_to_port(value: uuid.UUID) -> int | None:
    """The port a template-shaped GUID names, or None for any other GUID."""
    raw = value.bytes_le
    if raw[4:] != TEMPLATE.bytes_le[4:]:
        return None
    (port,) = struct.unpack_from("<I", raw)
    return port if port <= MAX_PORT else None


def parse_address(text: str | int | uuid.UUID) -> uuid.UUID:
    """A port number, a decimal string or a GUID -> the service GUID."""
    if isinstance(text, uuid.UUID):
        return text
    if isinstance(text, int):
        return port_to_guid(text)
    text = text.strip()
    if text.isdigit():
        return port_to_guid(int(text))
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a port (0..{MAX_PORT}) nor a GUID") from None


def describe(value: uuid.UUID) -> str:
    """A service for people: its port when it has one, else the GUID."""
    port = guid_to_port(value)
    return f"port {port}" if port is not None else str(value)


# -- the offer's user-defined area (OpenVMM HvsockUserDefinedParameters) --------

USER_DEFINED: Final = struct.Struct("<IBBI16s2x")  # 28 bytes, packed: version and silo id unaligned
PIPE_TYPE_BYTE: Final = 0
HVSOCK_VERSION_RS5: Final = 1


def user_defined(for_guest_accept: bool) -> bytes:
    """The 120-byte user-defined area of a socket offer."""
    return USER_DEFINED.pack(PIPE_TYPE_BYTE, int(for_guest_accept), 0, HVSOCK_VERSION_RS5, bytes(16)).ljust(120, b"\0")


@dataclass(frozen=True)
class SocketOffer:
    service: uuid.UUID
    endpoint: uuid.UUID
    for_guest_accept: bool

    @property
    def port(self) -> int | None:
        return guid_to_port(self.service)


def parse_offer(chn_flags: int, if_type: bytes, if_instance: bytes, area: bytes) -> SocketOffer | None:
    """A socket offer as the guest sees it, or None when it is not one we may
    open: no TLNPI flag, not byte mode, or a service that is no port."""
    if not chn_flags & TLNPI_PROVIDER_OFFER or len(area) < USER_DEFINED.size:
        return None
    pipe_type, accept, _container, _version, _silo = USER_DEFINED.unpack_from(area)
    service = uuid.UUID(bytes_le=bytes(if_type))
    if pipe_type != PIPE_TYPE_BYTE or accept > 1 or guid_to_port(service) is None:
        return None
    return SocketOffer(service, uuid.UUID(bytes_le=bytes(if_instance)), bool(accept))


# -- pipe-mode packets (vmbus-reference.md section 2.6) ---------------------------

PIPE_HEADER: Final = struct.Struct("<II")
PIPE_DATA: Final = 1
PIPE_PARTIAL: Final = 2
MAX_PIPE_DATA: Final = 16384  # Linux HVS_MTU_SIZE, OpenVMM MAXIMUM_PIPE_PACKET_SIZE


class PipeError(Exception):
    """A pipe packet that breaks the rules; the connection cannot go on."""


def pipe_header(size: int) -> bytes:
    return PIPE_HEADER.pack(PIPE_DATA, size)


def parse_pipe_packet(packet_type: int, payload: bytes | memoryview) -> memoryview:
    """The data of one pipe packet (empty for a FIN), or ``PipeError``."""
    if packet_type != PacketType.DATA_INBAND:
        raise PipeError(f"packet type {packet_type} on a pipe (only in-band data)")
    if len(payload) < PIPE_HEADER.size:
        raise PipeError(f"pipe packet of {len(payload)} bytes, shorter than its header")
    kind, size = PIPE_HEADER.unpack_from(payload)
    if kind != PIPE_DATA:
        raise PipeError(f"pipe packet type {kind} (only DATA)")
    if size > len(payload) - PIPE_HEADER.size or size > MAX_PIPE_DATA:
        raise PipeError(f"pipe data of {size} bytes in a packet of {len(payload)} (max {MAX_PIPE_DATA})")
    return memoryview(payload)[PIPE_HEADER.size : PIPE_HEADER.size + size]


# -- connect request and result on the control channel ------------------------------

OP_CONNECT_REQUEST: Final = 21  # TL_CONNECT_REQUEST
OP_CONNECT_RESULT: Final = 23  # TL_CONNECT_RESULT
CONNECT_REQUEST: Final = struct.Struct("<II16s16s")  # op, pad, guest endpoint, host service (40 bytes)
CONNECT_RESULT: Final = struct.Struct("<II16s16si")  # op, pad, endpoint, service, status (44 bytes)
STATUS_SUCCESS: Final = 0
STATUS_CONNECTION_REFUSED: Final = -0x3FFFFDCA  # 0xC0000236 as the i32 the result carries
STATUS_TOO_MANY: Final = -0x3FFFFF66  # 0xC000009A STATUS_INSUFFICIENT_RESOURCES


@dataclass(frozen=True)
class ConnectRequest:
    endpoint: uuid.UUID
    service: uuid.UUID

    def encode(self) -> bytes:
        return CONNECT_REQUEST.pack(OP_CONNECT_REQUEST, 0, self.endpoint.bytes_le, self.service.bytes_le)


def parse_connect_request(payload: bytes | memoryview) -> ConnectRequest | None:
    """A well-formed request (40 bytes or more, v2's silo id ignored), or None."""
    if len(payload) < CONNECT_REQUEST.size:
        return None
    op, _, endpoint, service = CONNECT_REQUEST.unpack_from(payload)
    if op != OP_CONNECT_REQUEST:
        return None
    return ConnectRequest(uuid.UUID(bytes_le=endpoint), uuid.UUID(bytes_le=service))


def connect_result(request: ConnectRequest, status: int) -> bytes:
    return CONNECT_RESULT.pack(OP_CONNECT_RESULT, 0, request.endpoint.bytes_le, request.service.bytes_le, status)


def parse_connect_result(payload: bytes | memoryview) -> tuple[uuid.UUID, int] | None:
    """(endpoint, status) of a result, or None when malformed."""
    if len(payload) < CONNECT_RESULT.size:
        return None
    op, _, endpoint, _service, status = CONNECT_RESULT.unpack_from(payload)
    return (uuid.UUID(bytes_le=endpoint), status) if op == OP_CONNECT_RESULT else None


# -- the host side's Unix socket handshake (Firecracker hybrid vsock) ------------

MAX_CONNECT_LINE: Final = 64  # "CONNECT " + a 36-character GUID + "\n" is 45


def parse_connect_line(line: bytes) -> uuid.UUID | None:
    """``CONNECT <port>`` or ``CONNECT <guid>`` (prefix any case) -> service GUID."""
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    word, _, rest = text.partition(" ")
    if word.upper() != "CONNECT" or not rest:
        return None
    try:
        return parse_address(rest)
    except ValueError:
        return None


# -- a byte pipe over one open channel (both sides' relays) -------------------------


class PipeChannel:
    """One connection's byte stream over its channel, for either side.

    ``receive_some`` drains packets (copied out, checked with
    ``parse_pipe_packet``) into a queue bounded by what one drain takes;
    ``send_all`` cuts data into DATA packets of at most 16 KiB, publishes a
    batch with one commit and, when the ring is full, waits for room
    through pending_send_sz: backpressure is ring space, nothing else.

    Who sleeps on the channel's interrupt: on the guest every waiter is woken
    (``shared_wakeups``), so a sender simply uses ``Channel.wait_for_room``.
    On the host one task may sleep on a channel's doorbell, so there the
    reader is the only sleeper and every wake-up it takes (its ``take`` runs
    after each one) also wakes a sender waiting for room; the reader must
    therefore keep draining for as long as anyone sends (``drain_forever``
    after the peer's FIN).
    """

    DRAIN_BATCH = 64  # packets per drain; with 16 KiB packets, what one ring holds

    def __init__(self, channel: Channel, *, shared_wakeups: bool) -> None:
        self.channel = channel
        self.shared_wakeups = shared_wakeups
        self._pending: collections.deque[bytes] = collections.deque()
        self._room = trio.Event()
        self.eof_received = False
        self.eof_sent = False
        self.bytes_received = 0
        self.bytes_sent = 0
        self.data_after_eof = 0  # packets a peer sent after its own FIN: dropped

    # -- receiving ------------------------------------------------------------

    def _take(self) -> int:
        """Drain up to a batch of packets; the number taken (0: none there)."""
        self._room.set()  # a wake-up may be the reader freeing room for our sender
        inc = self.channel.incoming
        taken = 0
        try:
            while taken < self.DRAIN_BATCH:
                pkt = inc.read_packet()
                if pkt is None:
                    break
                taken += 1
                data = parse_pipe_packet(pkt.type, pkt.payload)
                if self.eof_received:
                    self.data_after_eof += 1
                elif not data:
                    self.eof_received = True
                else:
                    chunk = bytes(data)  # copied out of shared memory before anyone uses it
                    self.bytes_received += len(chunk)
                    self._pending.append(chunk)
        finally:
            if taken:
                self.channel.commit_read(taken)
        return taken

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what the peer sent; b"" after its FIN."""
        while not self._pending and not self.eof_received:
            await self.channel.drain(self._take)
        if not self._pending:
            return b""
        first = self._pending[0]
        if len(first) >= max_bytes:
            if len(first) == max_bytes:
                return self._pending.popleft()
            self._pending[0] = first[max_bytes:]
            return first[:max_bytes]
        parts, size = [], 0
        while self._pending and size + len(self._pending[0]) <= max_bytes:
            parts.append(self._pending.popleft())
            size += len(parts[-1])
        return b"".join(parts)

    async def drain_forever(self) -> None:
        """Keep serving wake-ups (and dropping data) once nothing more is read."""
        while True:
            await self.channel.drain(self._take)
            self._pending.clear()

    # -- sending -----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        packets = [
            ([pipe_header(len(view[i : i + MAX_PIPE_DATA])), view[i : i + MAX_PIPE_DATA]], 0, False,
             PacketType.DATA_INBAND, b"")
            for i in range(0, len(view), MAX_PIPE_DATA)
        ]
        await self._send(packets)
        self.bytes_sent += len(view)

    async def send_eof(self) -> None:
        """The FIN: one DATA packet of size 0 (sent once)."""
        if self.eof_sent:
            return
        self.eof_sent = True
        await self._send([(pipe_header(0), 0, False, PacketType.DATA_INBAND, b"")])

    async def _send(self, packets: Sequence[tuple[Any, int, bool, int, bytes]]) -> None:
        if self.shared_wakeups:
            await self.channel.send_many(packets)
            return
        # Channel.send_many, except that the room is waited for through the reader.
        channel, out = self.channel, self.channel.outgoing
        i = staged = 0
        while i < len(packets):
            channel.check()
            payload, trans_id, completion, ptype, header = packets[i]
            try:
                out.write(payload, trans_id=trans_id, completion_requested=completion, packet_type=ptype)
            except RingFull as full:
                if staged:
                    channel.commit_write()
                    staged = 0
                    continue
                await self._wait_for_room(full.needed)
                continue
            i += 1
            staged += 1
            channel.stats.packets_sent += 1
        channel.commit_write()

    async def _wait_for_room(self, needed: int) -> None:
        self.channel.stats.ring_full_waits += 1
        self._room = trio.Event()
        # No checkpoint between arming and sleeping: the reader's take, which
        # sets the event, cannot run in between and be missed.
        if not self.channel.outgoing.arm_pending_send(needed):
            await self._room.wait()
        self.channel.outgoing.clear_pending_send()

    async def wait_peer_consumed(self, idle_timeout: float) -> bool:
        """Until the peer has read everything we sent (our FIN included): a
        rescind before that would take its last bytes with the channel.
        Gives up (False) only when the peer reads nothing for
        ``idle_timeout`` seconds: a slow reader is waited for, a stuck one
        is not.  A wake-up that shows no progress proves nothing (on the
        host every drain of the reader wakes us, room or not), so the
        deadline moves only when the ring's free space grows."""
        out = self.channel.outgoing
        deadline = trio.current_time() + idle_timeout
        while (space := out.write_space) < out.data_size:
            if trio.current_time() >= deadline:
                return False
            needed = min(space + 8, out.max_packet_total)
            with trio.move_on_at(deadline):
                if self.shared_wakeups:
                    await self.channel.wait_for_room(needed)
                else:
                    await self._wait_for_room(needed)
            if out.write_space > space:
                deadline = trio.current_time() + idle_timeout
            else:
                await trio.lowlevel.checkpoint()  # (a wait that found room at once did not yield)
        return True
