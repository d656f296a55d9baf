"""The storvsp's C fast path (``csrc/storvsp_fast.c``), served by the queue layer from a worker thread.

Once a channel is initialised, its rings belong to the queue layer's C
server (``ring.queue.Server``, ``pv_serve``) in a worker thread, with the
storvsp's handler (``storvsp_handle``): it takes the regular READ/WRITE
requests, moves their data with preadv/pwritev between the image and guest
RAM and stages their completions; the layer publishes, polls, then sleeps
on a dup of the channel's eventfd (reading it with RWF_NOWAIT: the guest
shares that eventfd and may clear its O_NONBLOCK), all without the GIL.
It comes back to Python only to interrupt the guest (``Channel.signal``, a
few microseconds per batch, from the same thread), and to hand over a
request it does not serve: ``run`` then returns and the device's Python
path takes exactly that request, so every error status and every control
operation keeps one implementation.

Stopping: a cancelled ``run`` calls ``Server.stop`` (a flag and the
server's own stop eventfd); the thread sees one or the other within one
batch, and ``run`` waits for it (the thread must be gone before guest RAM
may be unmapped).

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
import threading

import trio

from ring.build import check_device_module
from ring.queue import SERVE_SIGNAL, Server
from vmbus.channel import Channel
from vmbus.guest_memory import GuestMemory

from ._storvsp_c import ffi, lib
from .backend import DiskImage

check_device_module(ffi, lib, "host_drivers.storage._storvsp_c")

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


# What the handler counts beside the layer's counters (``ring.queue.SERVER_COUNTERS``).
DISK_COUNTERS = ("requests", "bytes_read", "bytes_written")


class FastPath:
    """One channel's C server: ``run`` serves until Python is needed."""

    def __init__(self, channel: Channel, memory: GuestMemory, disk: DiskImage, max_transfer: int,
                 poll_us: int = DEFAULT_POLL_US) -> None:
        if channel.event_fd is None:
            raise ValueError("the channel has no event fd to serve from a thread")
        self._limiter = trio.CapacityLimiter(1)  # this queue's own: no shared token held while it idles
        self.channel = channel
        d = self.disk = ffi.new("storvsp_disk *")
        d.ram = ffi.cast("uint8_t *", memory.c_address)
        d.ram_pages = memory.pages
        d.disk_fd = disk.fd
        d.block_size = disk.block_size
        d.blocks = disk.blocks
        d.max_transfer = max_transfer
        d.read_only = int(disk.read_only)
        _take_queue_slot()
        try:
            self.server = Server(channel.incoming, channel.outgoing, channel.event_fd,
                                 handle=ffi.addressof(lib, "storvsp_handle"), ctx=d, spin_us=poll_us,
                                 room_needed=lib.STORVSP_ROOM_NEEDED)
        except BaseException:
            _give_queue_slot()
            raise
        self._seen = (0, 0)

    def close(self) -> None:
        self.server.close()
        _give_queue_slot()

    def statistics(self) -> dict[str, int]:
        """The layer's counters and the disk's (plain loads of counters the
        serving thread bumps: each a whole aligned word, possibly a batch old)."""
        return {**self.server.counters(), **{name: int(getattr(self.disk, name)) for name in DISK_COUNTERS}}

    def _serve(self) -> int:
        """Worker thread: serve until a request needs Python or we are stopped."""
        server, channel = self.server, self.channel
        while True:
            rc = server.serve()
            if rc & SERVE_SIGNAL:
                channel.signal()
            if rc & ~SERVE_SIGNAL:
                return rc & ~SERVE_SIGNAL

    def _account(self) -> None:
        requests, wakeups = int(self.disk.requests), int(self.server.counters()["wakeups"])
        self.channel.stats.packets_received += requests - self._seen[0]
        self.channel.stats.packets_sent += requests - self._seen[0]
        self.channel.stats.wakeups += wakeups - self._seen[1]
        self._seen = (requests, wakeups)

    async def run(self) -> int:
        """Serve in a worker thread; returns the ``ring.queue.SERVE_*`` reason
        it stopped (SERVE_PUNT: the request at the head of the ring is Python's)."""
        self.server.rearm()

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:  # also after a normal return: harmless, the next run rearms
                self.server.stop()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_when_cancelled)
                # Not abandoned on cancel: the thread touches guest RAM and
                # must have returned before anyone may unmap it.
                rc: int = await trio.to_thread.run_sync(self._serve, limiter=self._limiter)
                nursery.cancel_scope.cancel()
        finally:
            self._account()
        return rc

