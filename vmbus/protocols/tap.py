"""What both halves of the synthetic NIC share outside the wire format.

- ``open_tap``: a Linux TAP interface (``/dev/net/tun``, ``TUNSETIFF`` with
  ``IFF_TAP | IFF_NO_PI``, tun(4)); the guest presents its NIC as one, the
  host's ``tap`` backend is one.  The descriptor is non-blocking: readers
  wait with ``trio.lowlevel.wait_readable``.  Links, addresses and
  namespaces are set through netlink by ``pyroute2``, not here.
- ``Outbox``: the one writer of a NIC channel's outgoing ring.  Each side
  has a task that must never block on sending (the one reading the
  incoming ring: if both sides' readers waited for ring room at once,
  neither would free any), so replies are queued here and a task of its
  own publishes them in batches, one commit per batch.  The queue is
  bounded: a producer waits (``room``) when it is full, which only stops
  that side's reading of a peer that does not read its replies.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from vmbus.channel import Channel

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


def open_tap(name: str) -> tuple[int, str]:
    """Create (or attach to a persistent) TAP interface ``name``; returns the
    non-blocking descriptor and the name the kernel gave it.  ``OSError``
    (ENOENT without /dev/net/tun, EPERM without CAP_NET_ADMIN, EBUSY for an
    interface another process holds)."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must have 1 to {IFNAMSIZ - 1} bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", raw, IFF_TAP | IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd, answer[:IFNAMSIZ].rstrip(b"\0").decode()


def read_frames(fd: int, limit: int, size: int = 65536) -> list[bytes]:
    """Up to ``limit`` frames waiting on a non-blocking TAP descriptor."""
    frames: list[bytes] = []
    while len(frames) < limit:
        try:
            frames.append(os.read(fd, size))
        except BlockingIOError:
            break
    return frames


class Outbox:
    """Packets for one channel's outgoing ring, published by ``run``."""

    def __init__(self, channel: Channel, limit: int = 4096) -> None:
        self.channel = channel
        self.limit = limit
        self._queue: deque[tuple[Any, int, bool, int, bytes]] = deque()
        self._wake = trio.Event()
        self._drained = trio.Event()

    def put(self, payload: Any, trans_id: int = 0, completion: bool = False, ptype: int = 6,
            header: bytes = b"") -> None:
        self._queue.append((payload, trans_id, completion, ptype, header))
        self._wake.set()

    def __len__(self) -> int:
        return len(self._queue)

    async def room(self) -> None:
        """Wait until the queue is below its limit."""
        while len(self._queue) >= self.limit:
            await self._drained.wait()

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            batch = list(self._queue)
            self._queue.clear()
            await self.channel.send_many(batch)
            self._drained.set()
            self._drained = trio.Event()
