"""One queue (channel) of the guest disk: its storage specifics over the queue layer.

A ``DiskQueue`` is a ``Requestor`` whose plain reads and writes are built
by ``storvsc_stage`` (csrc/storvsc_fast.c: the vstor packet, the READ/WRITE
16 CDB and the page list, straight into the ring) and whose completions are
taken and parsed by ``storvsc_reap``.  Python keeps the transaction ids and
everything else (control operations, INQUIRY, flush, UNMAP go through
``request_many``).  A reaped completion settles its request with the bytes
transferred when the command succeeded, or with the completion packet for
the driver to decode when it did not.

When to publish, mask, poll, re-check and sleep is the queue layer's
(``vmbus.queue.Poller``; its notes give the rules).  What is storage's:
polling pays only while at most ``POLL_BYTES_MAX`` is in flight on the
disk (beyond it the host's copies outlast a poll and need the CPUs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ring import Packet
from ring.build import check_device_module
from vmbus.channel import Batch, Channel, Requestor
from vmbus.errors import ChannelClosed, ChannelRevoked
from vmbus.queue import Poller

from ._storvsc_c import ffi, lib

check_device_module(ffi, lib, "guest_kernel.drivers._storvsc_c")

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
        self.bytes_in_flight = 0
        # The disk's queues, polled together (the driver shares one list
        # among all of them).
        self.group: list[DiskQueue] = [self]
        self.poller = Poller(self, self.reap, poll_us, wanted=self._poll_wanted,
                             group=lambda: [q.poller for q in self.group])
        self._out = ffi.cast("pv_ring *", channel.outgoing.c_address)
        self._in = ffi.cast("pv_ring *", channel.incoming.c_address)
        self._done = ffi.new("storvsc_completion[]", capacity)
        self._count = ffi.new("uint32_t *")
        self._needed = ffi.new("uint32_t *")

    def _poll_wanted(self) -> bool:
        return sum(q.bytes_in_flight for q in self.group) <= POLL_BYTES_MAX

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
            raise self.channel.incoming.corruption()
        return int(n)

    async def run(self) -> None:
        """Reap on every interrupt until the channel goes away."""
        try:
            await self.poller.run()
        except (ChannelRevoked, ChannelClosed):
            self.fail_all()

    async def wait(self, batch: Batch) -> None:
        await self.poller.wait(batch)

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
            # One cffi call fills the whole array (field order = tuple order).
            ios = ffi.new("storvsc_io[]", [(*request, tid) for request, tid in zip(requests, tids, strict=True)])
            done = 0

            def stage() -> tuple[int, bool, int]:
                nonlocal done
                rc = lib.storvsc_stage(self._out, self.block_size, ios + done, n - done, self._count, self._needed)
                staged = self._count[0]
                done += staged
                if rc == lib.PV_CORRUPT:
                    raise self.channel.outgoing.corruption()
                if rc not in (lib.PV_OK, lib.PV_FULL):
                    raise ValueError(f"a disk request the ring cannot take (rc={rc})")
                return staged, rc == lib.PV_OK, self._needed[0]

            await self.poller.publish(batch, stage)

        self.bytes_in_flight += volume
        try:
            return await self.transact(n, send)
        finally:
            self.bytes_in_flight -= volume
            for holder in held:  # sending failed before the wait let go
                self.poller.let_go(holder)

