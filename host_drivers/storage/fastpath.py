"""The storvsp's C fast path (``csrc/storvsp_fast.c``), run from a worker thread.

Once a channel is initialised, its rings belong to ``storvsp_serve`` in a
worker thread: it takes the regular READ/WRITE requests, moves their data
with preadv/pwritev between the image and guest RAM, completes them, and
polls then sleeps on a dup of the channel's eventfd, all without the GIL.
It comes back to Python only to interrupt the guest (``Channel.signal``, a
few microseconds per batch, from the same thread), and to hand over a
request it does not serve: ``run`` then returns and the device's Python
path takes exactly that request, so every error status and every control
operation keeps one implementation.

Stopping: a cancelled ``run`` sets ``stop`` and rings ``stop_fd``; the
thread sees one or the other within one batch, and ``run`` waits for it
(the thread must be gone before guest RAM may be unmapped).

Threads: each queue's thread sits in C for as long as the channel is open,
idle or not, so it must not take a token of trio's shared thread limiter
(40 tokens: ten idle four-queue guests would hold them all, and every
other ``to_thread`` call in the host, an eleventh guest's boot included,
would wait).  Each queue has a limiter of its own, and ``QUEUE_THREADS``
caps the queues served this way across the host; a channel opened beyond
the cap is served by the Python path (which holds a shared token only
while a batch runs), with one log line.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import trio

from vmbus.channel import Channel
from vmbus.guest_memory import GuestMemory

from ._storvsp_c import ffi, lib
from .backend import DiskImage

log = logging.getLogger(__name__)
DEFAULT_POLL_US = 200
QUEUE_THREADS = 512  # fast-path queues (one thread each) across the host

_queues_lock = threading.Lock()
_queues = 0


class NoQueueThread(Exception):
    """The host already serves ``QUEUE_THREADS`` queues in C."""


def _take_queue_slot() -> None:
    global _queues
    with _queues_lock:
        if _queues >= QUEUE_THREADS:
            raise NoQueueThread(f"{QUEUE_THREADS} storage queues already have a thread of their own")
        _queues += 1


def _give_queue_slot() -> None:
    global _queues
    with _queues_lock:
        _queues -= 1


def queue_threads_in_use() -> int:
    return _queues


class FastPath:
    """One channel's C server: ``run`` serves until Python is needed."""

    def __init__(self, channel: Channel, memory: GuestMemory, disk: DiskImage, max_transfer: int,
                 poll_us: int = DEFAULT_POLL_US) -> None:
        if channel.event_fd is None:
            raise ValueError("the channel has no event fd to serve from a thread")
        self._limiter = trio.CapacityLimiter(1)  # this queue's own: no shared token held while it idles
        self.channel = channel
        q = self.q = ffi.new("storvsp_queue *")
        q.inbound = ffi.cast("pv_ring *", channel.incoming.c_address)  # type: ignore[attr-defined]
        q.outbound = ffi.cast("pv_ring *", channel.outgoing.c_address)  # type: ignore[attr-defined]
        q.ram = ffi.cast("uint8_t *", memory.c_address)
        q.ram_pages = memory.pages
        q.disk_fd = disk.fd
        q.block_size = disk.block_size
        q.blocks = disk.blocks
        q.max_transfer = max_transfer
        q.read_only = int(disk.read_only)
        q.spin_us = poll_us
        self._kick = os.dup(channel.event_fd)  # ours: the bus may close its fd while we poll
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        q.kick_fd, q.stop_fd = self._kick, self._stop
        try:
            _take_queue_slot()
        except NoQueueThread:
            os.close(self._kick)
            os.close(self._stop)
            raise
        self._seen = (0, 0)

    def close(self) -> None:
        os.close(self._kick)
        os.close(self._stop)
        _give_queue_slot()

    def _serve(self) -> int:
        """Worker thread: serve until a request needs Python or we are stopped."""
        q, channel = self.q, self.channel
        while True:
            rc = lib.storvsp_serve(q)
            if rc & lib.SVQ_SIGNAL:
                channel.signal()
            rc &= ~lib.SVQ_SIGNAL
            if rc:
                return int(rc)

    def _account(self) -> None:
        requests, wakeups = int(self.q.requests), int(self.q.wakeups)
        self.channel.stats.packets_received += requests - self._seen[0]
        self.channel.stats.packets_sent += requests - self._seen[0]
        self.channel.stats.wakeups += wakeups - self._seen[1]
        self._seen = (requests, wakeups)

    async def run(self) -> int:
        """Serve in a worker thread; returns the SVQ_* reason it stopped
        (SVQ_PUNT: the request at the head of the ring is Python's)."""
        self.q.stop = 0
        try:
            os.eventfd_read(self._stop)
        except BlockingIOError:
            pass

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:  # also after a normal return: harmless, the next run resets both
                self.q.stop = 1
                os.eventfd_write(self._stop, 1)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_when_cancelled)
                # Not abandoned on cancel: the thread touches guest RAM and
                # must have returned before anyone may unmap it.
                rc: Any = await trio.to_thread.run_sync(self._serve, limiter=self._limiter)
                nursery.cancel_scope.cancel()
        finally:
            self._account()
        return int(rc)
