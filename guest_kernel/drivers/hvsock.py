"""Guest half of the sockets device: trio streams over hv_sock connections.

``kernel.device("sockets")`` is this driver.  ``await connect(port_or_guid)``
returns an ``HvSocketStream`` (a ``trio.abc.HalfCloseableStream``), and
``listen(port)`` an ``HvSocketListener`` (a ``trio.abc.Listener``), so any
trio protocol library runs over them.

Connecting (hvsock-reference.md section 3): the driver picks a local port,
sends the connect request on the control channel and waits for the answer;
a refusal is ``ConnectionRefusedError``.  On success the host has offered
the connection's channel; the kernel hands the driver every offer made
after boot (``claim_offer``) and the driver claims only socket offers it
expects: an endpoint it is connecting from, or a listening port with room
in its backlog (section 4).  Anything else (no hv_sock flag, a service GUID
that is no port, an endpoint nobody waits for) is left unopened and
counted, as Linux does.

Closing: ``send_eof`` sends the FIN; the other direction keeps flowing.
``aclose`` sends the FIN too and then keeps reading (and dropping) what
the host still sends until the host rescinds the channel, which is how
every connection ends.  A rescind before the host's FIN is a reset: the
stream's users get ``trio.BrokenResourceError`` once the data that came
before it has been read.

Shutting down (``quiesce``, before the kernel closes any channel): every
stream still open is closed as above, and the kernel waits up to
``CLOSE_TIMEOUT`` seconds (Linux's HVS_CLOSE_TIMEOUT) for the host to
rescind them all.  Closing a channel instead takes whatever the host had
not yet read of it (a program's last reply, still in the ring) with it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import uuid
from typing import Any

import trio

from vmbus.channel import Channel, Requestor
from vmbus.device import GuestDriver
from vmbus.errors import ChannelClosed, ChannelRevoked
from vmbus.protocols import hvsock

log = logging.getLogger(__name__)
FIRST_LOCAL_PORT = 1024  # the vsock core's ephemeral range starts here
DEFAULT_RECEIVE = 64 << 10
CONNECT_TIMEOUT = 10.0  # seconds from the host's answer to the channel being open
CLOSE_TIMEOUT = 8.0  # seconds a shutdown waits for the host to end closed connections (HVS_CLOSE_TIMEOUT)


class HvSocketStream(trio.abc.HalfCloseableStream):
    """One connection: bytes both ways, half-close, backpressure from the ring."""

    def __init__(self, channel: Channel, nursery: trio.Nursery, service: uuid.UUID, endpoint: uuid.UUID) -> None:
        self._pipe = hvsock.PipeChannel(channel, shared_wakeups=True)
        self._nursery = nursery  # the channel's own: it lives until the host rescinds
        self.service = service
        self.endpoint = endpoint
        self._closed = False
        self._sending = False
        self._receiving = False

    @property
    def port(self) -> int | None:
        return hvsock.guid_to_port(self.service)

    @property
    def channel(self) -> Channel:
        """The connection's channel (what ``pvbus inspect`` calls its relid)."""
        return self._pipe.channel

    def _broken(self, exc: BaseException) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(f"connection to {hvsock.describe(self.service)} reset: {exc}")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._pipe.eof_sent:
            raise trio.ClosedResourceError("send_eof was called: no more data may be sent")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await self._pipe.send_all(data)
        except (ChannelRevoked, ChannelClosed) as exc:
            raise self._broken(exc) from None
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            await self._pipe.send_eof()
        except (ChannelRevoked, ChannelClosed) as exc:
            raise self._broken(exc) from None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._receiving = True
        try:
            return await self._pipe.receive_some(max_bytes or DEFAULT_RECEIVE)
        except (ChannelRevoked, ChannelClosed) as exc:
            raise self._broken(exc) from None
        except hvsock.PipeError as exc:
            raise self._broken(exc) from None
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Once the host has rescinded the channel (its usual way of ending
            # a connection whose data are all read) there is nothing to linger
            # for, and the channel's nursery is gone or going.
            if self._pipe.channel.active:
                self._nursery.start_soon(self._linger)
        await trio.lowlevel.checkpoint()

    async def _linger(self) -> None:
        """FIN, then read and drop until the host rescinds the channel."""
        try:
            await self._pipe.send_eof()
            await self._pipe.drain_forever()
        except (ChannelRevoked, ChannelClosed, hvsock.PipeError):
            pass


class HvSocketListener(trio.abc.Listener[HvSocketStream]):
    """Connections host programs make to one guest port."""

    def __init__(self, driver: SocketsDriver, port: int, backlog: int) -> None:
        self._driver = driver
        self.port = port
        self._send, self._receive = trio.open_memory_channel[HvSocketStream](backlog)
        self.backlog = backlog
        self.closed = False

    def has_room(self) -> bool:
        return not self.closed and self._send.statistics().current_buffer_used < self.backlog

    def deliver(self, stream: HvSocketStream) -> bool:
        try:
            self._send.send_nowait(stream)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def accept(self) -> HvSocketStream:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise trio.ClosedResourceError("the listener is closed") from None

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._driver._listeners.pop(self.port, None)
            self._send.close()
            while True:
                try:
                    stream = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                await stream.aclose()
            self._receive.close()
        await trio.lowlevel.checkpoint()


class _Connecting:
    """A connect waiting for its channel."""

    def __init__(self, service: uuid.UUID) -> None:
        self.service = service
        self.stream: HvSocketStream | None = None
        self.ready = trio.Event()


class SocketsDriver(GuestDriver):
    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.requests = Requestor(channel, capacity=64)
        self._connecting: dict[uuid.UUID, _Connecting] = {}
        self._listeners: dict[int, HvSocketListener] = {}
        self._claimed: dict[int, tuple[hvsock.SocketOffer, _Connecting | HvSocketListener]] = {}
        self._local_ports = itertools.cycle(range(FIRST_LOCAL_PORT, hvsock.MAX_PORT + 1))
        self.counters: collections.Counter[str] = collections.Counter()
        self._streams: set[HvSocketStream] = set()  # every connection the host has not rescinded yet
        self._streams_changed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.requests.run)

    async def quiesce(self) -> None:
        """Close every connection and wait (``CLOSE_TIMEOUT`` at most) until
        the host has rescinded them: it has then relayed all they sent."""
        for stream in list(self._streams):
            await stream.aclose()
        with trio.move_on_after(CLOSE_TIMEOUT):
            while self._streams:
                await self._streams_changed.wait()
        if self._streams:
            self.counters["closes_timed_out"] += len(self._streams)

    async def stop(self) -> None:
        self.requests.fail_all()
        for waiting in self._connecting.values():
            waiting.ready.set()
        for listener in list(self._listeners.values()):
            listener.closed = True
            listener._send.close()

    # -- offers the kernel hands us ------------------------------------------------

    def claim_offer(self, offer: Any) -> bool:
        found = hvsock.parse_offer(offer.chn_flags, offer.if_type, offer.if_instance, offer.user_defined)
        if found is None:
            self.counters["offers_not_sockets"] += 1
            return False
        owner: _Connecting | HvSocketListener | None
        if found.for_guest_accept:
            owner = self._listeners.get(found.port) if found.port is not None else None
            if owner is None or not owner.has_room():
                self.counters["offers_no_listener"] += 1
                return False
        else:
            owner = self._connecting.get(found.endpoint)
            if owner is None or owner.service != found.service or owner.stream is not None:
                self.counters["offers_unexpected"] += 1
                return False
        self._claimed[offer.child_relid] = (found, owner)
        return True

    async def add_subchannel(self, channel: Channel, nursery: trio.Nursery) -> None:
        claimed = self._claimed.pop(channel.relid, None)
        if claimed is None:
            return
        found, owner = claimed
        stream = HvSocketStream(channel, nursery, found.service, found.endpoint)
        # The nursery lives until the host rescinds the channel (the kernel
        # cancels it then); this task keeps it open for a closing stream's
        # linger and tells ``quiesce`` when the connection is gone.
        self._streams.add(stream)
        nursery.start_soon(self._until_rescinded, stream)
        if isinstance(owner, HvSocketListener):
            if not owner.deliver(stream):
                await stream.aclose()
        elif self._connecting.get(found.endpoint) is owner:
            owner.stream = stream
            owner.ready.set()
        else:  # the connect gave up meanwhile
            await stream.aclose()

    async def _until_rescinded(self, stream: HvSocketStream) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._streams.discard(stream)
            self._streams_changed.set()
            self._streams_changed = trio.Event()

    # -- what programs call --------------------------------------------------------

    async def connect(self, address: int | str | uuid.UUID) -> HvSocketStream:
        """A connection to a host service: a port (0..0x7FFFFFFF) or a service GUID."""
        service = hvsock.parse_address(address)
        endpoint = self._free_endpoint()
        waiting = self._connecting[endpoint] = _Connecting(service)
        try:
            pkt = await self.requests.request(hvsock.ConnectRequest(endpoint, service).encode())
            result = hvsock.parse_connect_result(pkt.payload)
            if result is None or result[0] != endpoint:
                raise ConnectionError(f"connect to {hvsock.describe(service)}: malformed answer from the host")
            if result[1] != hvsock.STATUS_SUCCESS:
                raise ConnectionRefusedError(f"connect to {hvsock.describe(service)}: refused by the host "
                                             f"(status {result[1] & 0xFFFFFFFF:#x})")
            with trio.move_on_after(CONNECT_TIMEOUT):
                await waiting.ready.wait()
            if waiting.stream is None:
                self.channel.check()
                raise ConnectionError(f"connect to {hvsock.describe(service)}: the host accepted but offered "
                                      "no channel")
            return waiting.stream
        finally:
            del self._connecting[endpoint]

    def _free_endpoint(self) -> uuid.UUID:
        for _ in range(1 << 16):
            endpoint = hvsock.port_to_guid(next(self._local_ports))
            if endpoint not in self._connecting:
                return endpoint
        raise OSError("no free local port")  # pragma: no cover - 65536 connects at once

    def listen(self, port: int, backlog: int = 16) -> HvSocketListener:
        """Accept connections host programs make to ``port``."""
        hvsock.port_to_guid(port)  # ValueError outside 0..0x7FFFFFFF
        if port in self._listeners:
            raise OSError(f"port {port} is already listened on")
        listener = self._listeners[port] = HvSocketListener(self, port, backlog)
        return listener
