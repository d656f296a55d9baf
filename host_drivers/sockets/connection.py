"""One hv_sock connection on the host: its channel, its host socket, its end.

A ``Connection`` owns the host-side stream (a TCP or Unix socket) from the
moment it exists.  Its ``serve`` is what the bus runs once the guest opens
the connection's channel: it relays both directions through a
``PipeChannel`` until both ends have sent their FIN and the guest has read
everything (then the host rescinds the channel: every connection ends with
a rescind, hvsock-reference.md section 7), or until either side breaks it
(a reset, a pipe packet that breaks the rules: a rescind without FIN).
If the guest never opens the channel, ``abandon`` closes the stream and
rescinds the offer.  Whatever way it ends, the stream is closed and the
channel rescinded exactly once; a guest that dies mid-transfer cancels
``serve`` and leaves nothing behind.

The host never holds more than a ring's worth of a connection's data:
the relay reads the guest's ring only as fast as the host socket takes it,
and reads the host socket only as fast as the guest frees ring space.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import trio

from vmbus.channel import Channel
from vmbus.errors import ChannelClosed, ChannelRevoked
from vmbus.protocols import hvsock

log = logging.getLogger(__name__)
HOST_READ = 256 << 10  # bytes one host socket read may return
LINGER = 5.0  # seconds the guest may read nothing of our last bytes and FIN before the rescind


class Connection:
    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        service: uuid.UUID,
        endpoint: uuid.UUID,
        *,
        rescind: Callable[[int], None],
        count: Callable[[str], None],
        greeting: bytes = b"",
        finished: Callable[[Connection], None] | None = None,
    ) -> None:
        self.stream = stream
        self.service = service
        self.endpoint = endpoint
        self.relid: int | None = None
        self.opened = trio.Event()
        self._rescind = rescind
        self._count = count
        self._greeting = greeting  # written to the host stream once the guest has opened (OK <port>)
        self._finished = finished
        self._ended = False
        self.pipe: hvsock.PipeChannel | None = None
        self.to_host = self.to_guest = 0  # bytes, as counted when the relay ended

    def snapshot(self) -> dict[str, Any]:
        pipe = self.pipe
        return {"relid": self.relid, "service": hvsock.describe(self.service), "open": self.opened.is_set(),
                "to_host": pipe.bytes_received if pipe else self.to_host,
                "to_guest": pipe.bytes_sent if pipe else self.to_guest}

    async def wait_open(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            await self.opened.wait()
        return self.opened.is_set()

    async def serve(self, channel: Channel) -> None:
        """The guest opened the channel: relay until the connection ends."""
        self.opened.set()
        pipe = self.pipe = hvsock.PipeChannel(channel, shared_wakeups=False)
        try:
            if self._greeting:
                await self.stream.send_all(self._greeting)
            await relay(pipe, self.stream)
            self._count("closed")
        # (``except*``: the relay's two directions fail together, in a group)
        except* hvsock.PipeError as group:
            self._count("bad_pipe_packets")
            log.warning("channel %s: %s; connection reset", self.relid, group.exceptions[0])
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._count("reset_by_host_side")
        except* (ChannelRevoked, ChannelClosed):
            self._count("closed_by_guest")
        finally:
            if pipe.data_after_eof:
                self._count("data_after_fin")
            await self.end()

    async def abandon(self) -> None:
        """The guest did not open the channel in time (or the device stops)."""
        if not self.opened.is_set():
            self._count("not_opened")
        await self.end()

    async def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.pipe is not None:
            # Let go of the channel: its rings pin the mapping of guest RAM,
            # which a partition going away must be able to unmap (and the
            # bus keeps ``serve``, hence this connection, until then).
            self.to_host, self.to_guest = self.pipe.bytes_received, self.pipe.bytes_sent
            self.pipe = None
        with trio.CancelScope(shield=True):
            await self.stream.aclose()
        if self.relid is not None:
            try:
                self._rescind(self.relid)
            except Exception:  # noqa: BLE001 - the partition may be going away under us
                log.debug("rescind of channel %s failed", self.relid, exc_info=True)
        if self._finished is not None:
            self._finished(self)


async def relay(pipe: hvsock.PipeChannel, stream: trio.abc.HalfCloseableStream) -> None:
    """Both directions until both FINs are through and the guest read ours."""
    guest_done = trio.Event()

    async def guest_to_host() -> None:
        while data := await pipe.receive_some(HOST_READ):
            await stream.send_all(data)
        await stream.send_eof()
        guest_done.set()
        await pipe.drain_forever()  # the reader also wakes our sender: it stays until the end

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest_to_host)
        while data := await stream.receive_some(HOST_READ):
            await pipe.send_all(data)
        await pipe.send_eof()
        await guest_done.wait()
        await pipe.wait_peer_consumed(LINGER)
        nursery.cancel_scope.cancel()

