"""Doorbells: the eventfd that carries "look at the ring" between processes.

A doorbell is deliberately dumb.  The ring decides *whether* to signal
(``commit`` returns the decision); the doorbell only delivers it.  One
eventfd per direction per channel, as vhost-user does; the fd travels to
the peer with SCM_RIGHTS and both ends hold the same kernel object.

- ``ring()`` adds 1 to the counter.  On an eventfd only we hold it never
  blocks (the counter saturates only after 2**64 - 2 unread signals); on
  one a peer holds too, the peer can park the counter at that maximum and
  clear O_NONBLOCK, and then it does: a side that must never block (the
  host) rings such fds only from a thread of its own (``vmbus.interrupts``).
- ``wait()`` is awaitable in trio: it tries a non-blocking read first and
  only then parks on ``trio.lowlevel.wait_readable``; ``wait_blocking()``
  serves plain threads and processes that do not run trio.  A doorbell
  made with ``blocking=True`` is waited on with one blocking ``read``
  (one system call per wake-up instead of three); it cannot be awaited in
  trio.  O_NONBLOCK belongs to the open file, which every process holding
  the fd shares, so choose it when the eventfd is created.

Reading never depends on that shared flag.  ``try_consume`` (and so
``wait``) reads with ``preadv2(..., RWF_NOWAIT)``: "do not block" is a
property of that one call, not of the open file, so a peer that clears
O_NONBLOCK on the eventfd (it may: the flag lives on the open file
description both processes share, and an eventfd cannot be reopened to
get a private one) cannot make the reader block, nor can a peer that
drains the counter between our poll and our read.  Linux has honoured
RWF_NOWAIT on eventfd reads since 5.12; on an older kernel the read falls
back to a poll(0) check first, which closes the first hole and not the
second (stated here so nobody relies on more).
- ``close()`` calls ``trio.lowlevel.notify_closing`` first, so a task parked
  in ``wait()`` wakes with ``trio.ClosedResourceError`` instead of hanging,
  the pattern of trio's own ``FdStream``.

Counters: ``rings`` (signals sent) and ``wakeups`` (reads that found the
counter non-zero) and ``signals_received`` (the sum of what those reads
returned: several rings may coalesce into one wakeup).
"""

from __future__ import annotations

import errno
import os
import select

import trio

_COUNTER_BYTES = 8


def read_counter_nowait(fd: int) -> int:
    """Take an eventfd's counter (0 if it is zero) without ever blocking,
    whatever O_NONBLOCK another holder of the fd has set or cleared."""
    buf = bytearray(_COUNTER_BYTES)
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        # Kernel older than 5.12: no per-call non-blocking read on eventfd.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(0):
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0
    return int.from_bytes(buf, "little")


class Doorbell:
    """One eventfd, non-blocking, close-on-exec."""

    def __init__(self, fd: int | None = None, *, blocking: bool = False) -> None:
        if fd is None:
            fd = os.eventfd(0, os.EFD_CLOEXEC | (0 if blocking else os.EFD_NONBLOCK))
        else:
            os.set_blocking(fd, blocking)
        self._fd = fd
        self.blocking = blocking
        self._poller: select.poll | None = None
        self.rings = 0
        self.wakeups = 0
        self.signals_received = 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise trio.ClosedResourceError("doorbell is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def ring(self) -> None:
        """Signal the peer."""
        os.eventfd_write(self.fileno(), 1)
        self.rings += 1

    def _count(self, n: int) -> int:
        self.wakeups += 1
        self.signals_received += n
        return n

    def try_consume(self) -> int:
        """Read and reset the counter without blocking; 0 if nothing came."""
        if self.blocking:
            raise RuntimeError("a blocking doorbell can only be waited on with wait_blocking()")
        n = read_counter_nowait(self.fileno())
        return self._count(n) if n else 0

    async def wait(self) -> int:
        """Wait (in trio) until the doorbell has rung; returns how many times."""
        while True:
            n = self.try_consume()
            if n:
                return n
            await trio.lowlevel.wait_readable(self.fileno())

    def wait_blocking(self, timeout: float | None = None) -> int:
        """Wait without trio (a plain process or thread); 0 on timeout."""
        while True:
            if timeout is not None or not self.blocking:
                if self._poller is None:
                    self._poller = select.poll()
                    self._poller.register(self.fileno(), select.POLLIN)
                if not self._poller.poll(None if timeout is None else timeout * 1000):
                    return 0
            if self.blocking:  # readable now, or no timeout: one read, blocking until a signal
                return self._count(os.eventfd_read(self.fileno()))
            if n := self.try_consume():
                return n

    def close(self) -> None:
        """Wake any waiter with ClosedResourceError, then close the fd."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:
            pass  # not inside trio: nobody can be parked in wait()
        try:
            os.close(fd)
        except OSError as exc:  # pragma: no cover - already closed by someone
            if exc.errno != errno.EBADF:
                raise

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
