"""One queue (channel) of the guest disk, with its per-request work in C.

A ``DiskQueue`` is a ``Requestor`` whose plain reads and writes are built
by ``storvsc_stage`` (csrc/storvsc_fast.c: the vstor packet, the READ/WRITE
16 CDB and the page list, straight into the ring) and whose completions are
taken and parsed by ``storvsc_reap``.  Python keeps the transaction ids,
the waiting and everything else (control operations, INQUIRY, flush,
UNMAP go through ``request_many`` as before).  A reaped completion settles
its request with the bytes transferred when the command succeeded, or with
the completion packet for the driver to decode when it did not.

Waiting polls: a submitter that will poll masks its queue's interrupt
*before* it publishes the requests (a small request completes within
microseconds, often before the submitter gets to poll, and an unmasked
completion then costs the host an interrupt and us a wake-up).  It then
spins in C on every busy queue of the disk for up to ``poll_us``
microseconds and reaps what arrives itself; only then does it unmask,
re-check and sleep on the interrupt, which the ``run`` task serves.
``poll_us = 0`` is pure interrupt mode.

Masks are held, not set: each poller holds the queues it looks at (a
token per holder), a queue's interrupt is masked while anyone holds it,
and the last one to let go unmasks and re-checks.  A holder lets go
before it sleeps on anything, so a masked queue always has a task that
will look at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from ring import Packet
from vmbus.channel import Channel, Requestor, Batch
from vmbus.errors import ChannelClosed, ChannelRevoked

from ._storvsc_c import ffi, lib

DEFAULT_POLL_US = 200
# Poll only while at most this much data is in flight: beyond it the host's
# copies take longer than a poll, and on a small machine a spinning guest
# takes a CPU from them.
POLL_BYTES_MAX = 512 << 10


class DiskQueue(Requestor):
    def __init__(self, channel: Channel, capacity: int, block_size: int = 512,
                 poll_us: int = DEFAULT_POLL_US) -> None:
        super().__init__(channel, capacity)
        self.block_size = block_size
        self.poll_us = poll_us
        self.bytes_in_flight = 0
        # The disk's queues this one polls along with itself (the driver
        # shares one list among all of them).
        self.group: list[DiskQueue] = [self]
        self._out = ffi.cast("pv_ring *", channel.outgoing.c_address)  # type: ignore[attr-defined]
        self._in = ffi.cast("pv_ring *", channel.incoming.c_address)  # type: ignore[attr-defined]
        self._done = ffi.new("storvsc_completion[]", capacity)
        self._count = ffi.new("uint32_t *")
        self._needed = ffi.new("uint32_t *")
        self._holders: set[object] = set()

    # -- interrupt masking ------------------------------------------------

    def hold(self, holder: object) -> None:
        """``holder`` is about to poll this queue: no interrupts needed."""
        if not self._holders:
            self.channel.incoming.mask()
        self._holders.add(holder)

    def let_go(self, holder: object) -> None:
        """``holder`` stops looking; the last holder unmasks, then reaps what
        came between its last look and the unmask (that raised no interrupt),
        and re-checks after each reap: the host does not signal a completion
        it publishes while our reaped ones are still uncommitted (the ring was
        not empty for it), so only a re-check after our commit finds it."""
        if holder not in self._holders:
            return
        self._holders.discard(holder)
        while not self._holders and self.channel.active and self.channel.incoming.unmask():
            self.reap()

    def _poll_wanted(self) -> bool:
        """Poll only small transfers: beyond POLL_BYTES_MAX in flight the
        host's copies outlast a poll and need the CPUs."""
        return bool(self.poll_us) and sum(q.bytes_in_flight for q in self.group) <= POLL_BYTES_MAX

    # -- completions ------------------------------------------------------

    def reap(self) -> int:
        """Take every completion waiting (up to the queue's capacity), settle
        each; returns how many.  Raises RingCorrupt after settling what came
        before the corruption."""
        rc = lib.storvsc_reap(self._in, self._done, len(self._done), self._count)
        n = self._count[0]
        if n:
            self.channel.commit_read(n)
        for i in range(n):
            c = self._done[i]
            if c.ok:
                self.settle(c.trans_id, c.type, c.transferred)
            else:
                payload = bytes(ffi.buffer(c.payload, c.payload_len))
                self.settle(c.trans_id, c.type, Packet(c.type, 0, c.trans_id, b"", payload))
        if rc == lib.PV_CORRUPT:
            raise self.channel.incoming.corruption()  # type: ignore[attr-defined]
        return int(n)

    async def run(self) -> None:
        """Reap on every interrupt until the channel goes away."""
        try:
            while True:
                await self.channel.drain(self.reap)
        except (ChannelRevoked, ChannelClosed):
            self.fail_all()

    async def wait(self, batch: Batch) -> None:
        """Poll every busy queue of the disk (``group``) for up to
        ``poll_us`` at a time, reaping whatever arrives, until ``batch`` is
        done; sleep on the interrupt once a poll comes back empty.

        Whenever our reaping completes another task's batch we step aside
        so that it runs at once (it has its results, and likely its next
        requests to send); otherwise the poll keeps the CPU for at most
        ``poll_us``.  (Asking trio whether any task is runnable costs more
        than a 4 KiB request: its statistics walk every registered fd.)"""
        try:
            while not batch.done.is_set() and self.channel.active and self._poll_wanted():
                busy = [q for q in self.group if q.outstanding and q.channel.active]
                for q in busy:
                    q.hold(batch)
                rings = ffi.new("pv_ring *[]", [q._in for q in busy])
                woke_another = False
                while not batch.done.is_set():
                    ready = lib.pv_ring_poll_many(rings, len(busy), self.poll_us)
                    if ready < 0:
                        break
                    self.channel.polls_hit += 1  # came while we polled: no interrupt spent on it
                    queue = busy[ready]
                    completed = queue.batches_completed
                    queue.reap()
                    if queue.batches_completed - completed > batch.done.is_set():
                        woke_another = True
                        break
                if not woke_another:
                    break  # done, or nothing came in time: sleep on the interrupt (letting go re-checks)
                await trio.lowlevel.checkpoint()  # the task we woke runs; we poll again after it
        finally:
            for q in self.group:
                q.let_go(batch)
        await batch.done.wait()

    # -- reads and writes -------------------------------------------------

    async def io(self, requests: Sequence[tuple[int, int, int, bool, bool]]) -> list[Any]:
        """Reads and writes ``(lba, first pfn, blocks, write, fua)`` of
        consecutive pages; answers in order: the bytes transferred, or the
        completion ``Packet`` of a command that failed."""
        n = len(requests)
        volume = sum(request[2] for request in requests) * self.block_size

        held: list[object] = []

        async def send(tids: list[int]) -> None:
            batch = self._slots[tids[0] - 1]
            held.append(batch)
            if self._poll_wanted():
                self.hold(batch)  # masked before the host can answer: see the module notes
            # One cffi call fills the whole array (field order = tuple order).
            ios = ffi.new("storvsc_io[]", [(*request, tid) for request, tid in zip(requests, tids)])
            done = 0
            while True:
                rc = lib.storvsc_stage(self._out, self.block_size, ios + done, n - done, self._count, self._needed)
                staged = self._count[0]
                done += staged
                if staged:
                    self.channel.stats.packets_sent += staged
                    self.channel.commit_write()
                if rc == lib.PV_OK:
                    break
                if rc == lib.PV_CORRUPT:
                    raise self.channel.outgoing.corruption()  # type: ignore[attr-defined]
                if rc != lib.PV_FULL:
                    raise ValueError(f"a disk request the ring cannot take (rc={rc})")
                if not staged:
                    self.let_go(batch)  # sleeping: the interrupt must be able to wake us
                    await self.channel.wait_for_room(self._needed[0])

        self.bytes_in_flight += volume
        try:
            return await self.transact(n, send)
        finally:
            self.bytes_in_flight -= volume
            for holder in held:  # sending failed before the wait let go
                self.let_go(holder)
