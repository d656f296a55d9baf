"""A channel: one ring pair plus the means to signal and be signalled.

Shared by both sides.  The host's worker and the guest's driver see the
same object: ``send`` stages and publishes packets following the ring's
signalling decision; ``receive`` drains a batch with interrupts masked,
copies every packet out of shared memory before anyone looks at it (the
peer may rewrite the ring under us), commits once, and only sleeps after
unmasking and re-checking.  What "signal" and "wait" mean is supplied by
the side: on the guest a HvSignalEvent (one eventfd write) and a wake-up
from the SynIC interrupt; on the host an event-flag bit plus the guest's
SINT eventfd, and the channel's own eventfd.

``Requestor`` adds transaction ids for request/completion protocols: ids
are 1-based slots in a table of outstanding requests, never pointers, and
a completion is accepted only for an id that is outstanding (reference
section 8.1, "Transaction IDs").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ring import IncomingRing, OutgoingRing, Packet, PacketType, RingFull

from .errors import ChannelClosed, ChannelRevoked
from .queue import drain

log = logging.getLogger(__name__)


@dataclass
class ChannelStatistics:
    packets_sent: int = 0
    packets_received: int = 0
    signals_sent: int = 0
    wakeups: int = 0
    ring_full_waits: int = 0
    corrupt: bool = False


class Channel:
    """One open channel as seen from one side."""

    def __init__(
        self,
        relid: int,
        outgoing: OutgoingRing,
        incoming: IncomingRing,
        signal: Callable[[], None],
        wait: Callable[[], Awaitable[None]],
    ) -> None:
        self.relid = relid
        self.outgoing = outgoing
        self.incoming = incoming
        self._signal = signal
        self._wait = wait
        self.closed = False
        self.revoked = False
        self._revoked_because: ChannelRevoked | None = None
        self.stats = ChannelStatistics()
        self.sub_index = 0
        # Adaptive polling: after draining, spin this many times (in C, GIL
        # released, event loop held) for more packets before unmasking and
        # sleeping.  0 = pure interrupt mode.  Worth it when the peer answers
        # within microseconds (a request/completion device under load).
        self.poll_spins = 0
        self.polls_hit = 0
        # Host side, primary channels only: ask the bus to offer sub-channels.
        self.request_subchannels: Callable[[int], int] | None = None
        # Host side, primary channels only: offer a channel of the device's own
        # at run time and rescind it (``VmbusServer.offer_channel``).
        self.offer_channel: Callable[..., int | None] | None = None
        self.rescind_channel: Callable[[int], None] | None = None
        # The eventfd the peer's signals arrive on, for a device that serves
        # the rings from a worker thread (it polls a dup of it; ``wait``
        # stays the way for tasks).  None where the side has no such fd.
        self.event_fd: int | None = None
        # Buffers the guest describes beyond the rings (a NIC's receive and
        # send buffers), each a GPADL of its own.  Host side: ``gpadl(handle)``
        # gives the pages of a complete GPADL the guest made for this
        # device (``GuestMemoryError`` for any other handle).  Guest side:
        # ``create_gpadl(pfns)`` -> handle and ``teardown_gpadl(handle)``.
        # None where the side has no bus behind it.
        self.gpadl: Callable[[int], Sequence[int]] | None = None
        self.create_gpadl: Callable[[Sequence[int]], Awaitable[int]] | None = None
        self.teardown_gpadl: Callable[[int], Awaitable[None]] | None = None

    @property
    def active(self) -> bool:
        """Neither closed nor rescinded: requests may still go out."""
        return not (self.revoked or self.closed)

    def revoked_error(self) -> ChannelRevoked:
        """What a user of a revoked channel gets: the error it was revoked
        with (``HostGone`` when the host went away), else a rescind."""
        if self._revoked_because is not None:
            return type(self._revoked_because)(str(self._revoked_because))
        return ChannelRevoked(f"channel {self.relid} was rescinded")

    def check(self) -> None:
        """Raise ChannelRevoked or ChannelClosed unless the channel is active."""
        self._check()

    def _check(self) -> None:
        if self.revoked:
            raise self.revoked_error()
        if self.closed:
            raise ChannelClosed(f"channel {self.relid} is closed")

    def signal(self) -> None:
        self.stats.signals_sent += 1
        self._signal()

    async def wait_interrupt(self) -> None:
        await self._wait()
        self.stats.wakeups += 1
        self._check()

    # -- sending --------------------------------------------------------

    async def send(
        self,
        payload: bytes | memoryview | Sequence[bytes | memoryview],
        *,
        trans_id: int = 0,
        completion_requested: bool = False,
        packet_type: int = PacketType.DATA_INBAND,
        header: bytes = b"",
    ) -> None:
        """Send one packet, waiting for room if the ring is full."""
        await self.send_many([(payload, trans_id, completion_requested, packet_type, header)])

    async def send_many(self, packets: Sequence[tuple[Any, int, bool, int, bytes]]) -> None:
        """Stage many packets, publish them with as few commits as the ring
        allows (one when they fit), signalling only when the ring says so."""
        out = self.outgoing
        i = staged = 0
        while i < len(packets):
            self._check()
            payload, trans_id, completion, ptype, header = packets[i]
            try:
                out.write(payload, trans_id=trans_id, completion_requested=completion,
                          packet_type=ptype, header=header)
            except RingFull as full:
                if staged:  # publish what we have; then the room we need is just this packet's
                    self.commit_write()
                    staged = 0
                    continue
                await self.wait_for_room(full.needed)
                continue
            i += 1
            staged += 1
            self.stats.packets_sent += 1
        self.commit_write()

    def commit_write(self) -> None:
        """Publish everything staged; signal if the ring says so."""
        if self.outgoing.commit():
            self.signal()

    async def wait_for_room(self, needed: int) -> None:
        """Nothing staged and no room for ``needed`` bytes: ask the reader to
        signal once there is (pending_send_sz) and sleep until then."""
        self._check()
        self.stats.ring_full_waits += 1
        if not self.outgoing.arm_pending_send(needed):
            await self.wait_interrupt()
        self.outgoing.clear_pending_send()

    async def complete(self, trans_id: int, payload: bytes | memoryview = b"") -> None:
        await self.send(payload, trans_id=trans_id, packet_type=PacketType.COMPLETION)

    # -- receiving ------------------------------------------------------

    def _take(self, limit: int) -> list[Packet]:
        inc = self.incoming
        got: list[Packet] = []
        while len(got) < limit:
            pkt = inc.read_packet()
            if pkt is None:
                break
            # Private copies: the peer can change shared memory at will.
            got.append(Packet(pkt.type, pkt.flags, pkt.trans_id, bytes(pkt.header), bytes(pkt.payload)))
        if got:
            self.commit_read(len(got))
        return got

    def commit_read(self, packets: int) -> None:
        """Release what a drain took (``packets`` of them): one index store,
        and a signal if a writer waits for that room."""
        self.stats.packets_received += packets
        if self.incoming.commit():
            self.signal()

    async def receive(self, limit: int = 256) -> list[Packet]:
        """The next batch of packets (at least one), copied out of the ring."""
        got: list[Packet] = await self.drain(lambda: self._take(limit))
        return got

    async def drain(self, take: Callable[[], Any]) -> Any:
        """Call ``take`` with interrupts masked until it returns something
        truthy; in between poll (``poll_spins``), unmask, re-check and sleep.
        ``take`` reads packets itself (``_take``, or a device's C reaper) and
        releases them with ``commit_read``.  The sequence is the queue
        layer's (``vmbus.queue.drain``)."""
        return await drain(self, take)

    def close(self) -> None:
        self.closed = True

    def revoke(self, because: ChannelRevoked | None = None) -> None:
        self.revoked = True
        self._revoked_because = because


class Batch:
    """Requests sent together and waited for together: one wake-up per batch."""

    __slots__ = ("remaining", "done", "results")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.done = trio.Event()
        self.results: dict[int, Any] = {}


class Requestor:
    """Outstanding requests of one channel, keyed by 1-based slot ids."""

    def __init__(self, channel: Channel, capacity: int = 256) -> None:
        self.channel = channel
        self._slots: list[Batch | None] = [None] * capacity
        self._free = list(range(capacity, 0, -1))
        self._room = trio.Condition()
        self._waiting_for_room = 0
        self.stray_completions = 0
        self.failed_in_flight = 0  # requests woken by a rescind before their completion came
        self.batches_completed = 0  # (a poller compares it to see whether its reaping woke a waiter)

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._slots) - len(self._free)

    async def request(self, payload: bytes | Sequence[bytes], **kwargs: Any) -> Packet:
        """Send ``payload`` with completion requested; return the completion."""
        return (await self.request_many([(payload, kwargs.get("packet_type", PacketType.DATA_INBAND),
                                           kwargs.get("header", b""))]))[0]

    async def _take_slots(self, count: int) -> list[int]:
        tids: list[int] = []
        while len(tids) < count:
            if self._free:
                # Free slots are taken without a checkpoint: a batch of N
                # requests costs no N scheduler round trips.
                take = min(count - len(tids), len(self._free))
                tids.extend(self._free.pop() for _ in range(take))
            else:
                self._waiting_for_room += 1
                try:
                    async with self._room:
                        while not self._free:
                            await self._room.wait()
                finally:
                    self._waiting_for_room -= 1
        return tids

    async def request_many(self, items: Sequence[tuple[Any, int, bytes]]) -> list[Packet]:
        """Send many requests (payload, packet type, type-specific header) with
        one ring commit where they fit; return their completions in order."""
        if not items:
            return []

        async def send(tids: list[int]) -> None:
            await self.channel.send_many(
                [(payload, tid, True, ptype, header) for (payload, ptype, header), tid in zip(items, tids, strict=True)]
            )

        return await self.transact(len(items), send)

    async def transact(self, count: int, send: Callable[[list[int]], Awaitable[None]]) -> list[Any]:
        """Take ``count`` transaction ids, ``send`` the requests under them,
        and return the answers in id order (whatever ``settle`` recorded)."""
        tids: list[int] = []
        try:
            tids = await self._take_slots(count)
            batch = Batch(len(tids))
            for tid in tids:
                self._slots[tid - 1] = batch
            await send(tids)
            await self.wait(batch)
            if batch.remaining:
                raise self.channel.revoked_error()
            return [batch.results[t] for t in tids]
        finally:
            for tid in tids:
                self._slots[tid - 1] = None
                self._free.append(tid)
            if tids and self._waiting_for_room:  # (taking the lock is a checkpoint: only if needed)
                async with self._room:
                    self._room.notify_all()

    async def wait(self, batch: Batch) -> None:
        """Until every request of ``batch`` is answered (or the channel goes);
        a subclass may poll here instead of sleeping at once."""
        await batch.done.wait()

    def deliver(self, pkt: Packet) -> bool:
        """Hand a completion to its waiter; False (and counted) if no such request."""
        return self.settle(pkt.trans_id, pkt.type, pkt)

    def settle(self, tid: int, packet_type: int, result: Any) -> bool:
        """Record ``result`` as the answer to request ``tid`` (what the
        waiter gets back); False, counted as stray, unless ``tid`` is
        outstanding, unanswered, and this is a completion packet."""
        if packet_type != PacketType.COMPLETION or not 1 <= tid <= len(self._slots):
            self.stray_completions += 1
            return False
        batch = self._slots[tid - 1]
        if batch is None or tid in batch.results:
            self.stray_completions += 1
            return False
        batch.results[tid] = result
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.done.set()
            self.batches_completed += 1
        return True

    def fail_all(self) -> None:
        """Wake every waiter (after a rescind): they raise ChannelRevoked."""
        for batch in {id(b): b for b in self._slots if b is not None}.values():
            if not batch.done.is_set():
                self.failed_in_flight += batch.remaining
                batch.done.set()

    async def run(self) -> None:
        """Deliver completions until the channel goes away."""
        try:
            while True:
                for pkt in await self.channel.receive():
                    if not self.deliver(pkt):
                        log.warning("channel %d: stray completion id %d", self.channel.relid, pkt.trans_id)
        except (ChannelRevoked, ChannelClosed):
            self.fail_all()
