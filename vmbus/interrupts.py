"""The host's writes into eventfds a guest shares: one thread per partition.

The host interrupts a guest by adding 1 to the guest's SINT eventfd, and a
guest that posts HvSignalEvent as a hypercall has the host ring a channel's
eventfd for it.  Both fds are shared with the guest, and an eventfd write
blocks when the counter would reach 2**64 - 1 and O_NONBLOCK is clear: the
counter and the flag (it lives on the open file description, which every
holder shares) are the guest's to set.  Linux offers no way out in the
call itself: ``pwritev2(RWF_NOWAIT)`` on an eventfd fails with EOPNOTSUPP,
and an eventfd cannot be reopened to get a description of our own.  A
check before the write (poll for POLLOUT, F_GETFL) is a race the guest
wins by refilling the counter in between.

So the host never writes such an fd from its event loop.  ``Signaller``
owns a thread that does every one of these writes for one partition.  The
event loop (and the storage fast path's threads) only mark what is due and
poke the thread through an eventfd only the host holds, whose counter the
thread drains: that poke cannot block.  A guest that stalls the write
stalls its own interrupts and nothing else.

Stopping (``aclose``): the thread is told to stop; if it is parked inside a
guest's write, it is sent ``STOP_SIGNAL``, whose handler does nothing and
is installed without SA_RESTART, so the write returns EINTR and the thread
exits.  Where that handler cannot be installed (the host's trio loop not on
the main thread), the counter is drained with a non-blocking read instead,
which wakes the write unless the guest refills the counter first; after
``STOP_DEADLINE`` seconds the thread is left to exit on its own (it holds
one dup of the guest's fd until then) and the release carries on.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import deque
from collections.abc import Hashable

import trio

from ring.doorbell import read_counter_nowait

log = logging.getLogger(__name__)

STOP_SIGNAL = signal.SIGRTMIN + 4
STOP_DEADLINE = 10.0
_handler_installed = False


def _install_stop_handler() -> bool:
    """A no-op handler for STOP_SIGNAL, once, from the main thread only."""
    global _handler_installed
    if not _handler_installed and threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, lambda signum, frame: None)
        signal.siginterrupt(STOP_SIGNAL, True)  # no SA_RESTART: a blocked write returns EINTR
        _handler_installed = True
    return _handler_installed


class Signaller:
    """Writes to one partition's guest-shared eventfds, from its own thread.

    Owns ``sint_fd`` from construction on (closes it when stopped)."""

    def __init__(self, name: str, sint_fd: int) -> None:
        self._interruptible = _install_stop_handler()
        self._sint = sint_fd
        self._sint_due = False
        self._once: deque[tuple[Hashable, int]] = deque()  # (key, our dup of the fd)
        self._once_keys: set[Hashable] = set()
        self._writing = -1  # the guest fd the thread is writing now, -1 if none
        # Host-only, blocking: the thread sleeps in read(); a poke never blocks
        # because the thread drains the counter after every wake-up.
        self._trigger = os.eventfd(0, os.EFD_CLOEXEC)
        self._lock = threading.Lock()  # orders "stopping" against the last poke
        self._stopping = False
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=f"signaller-{name}", daemon=True)
        self._thread.start()

    # -- called from the event loop or any host thread ---------------------

    def raise_sint(self) -> None:
        """Interrupt the guest (add 1 to its SINT eventfd) soon."""
        self._sint_due = True  # before the poke: the thread looks after reading it
        self._poke()

    def ring(self, key: Hashable, fd: int) -> None:
        """Add 1 to ``fd`` (an eventfd the guest shares) soon; rings for a
        ``key`` already waiting coalesce into one."""
        if self._stopping or key in self._once_keys:
            return
        self._once_keys.add(key)
        self._once.append((key, os.dup(fd)))  # ours: the caller may close its fd meanwhile
        self._poke()

    def _poke(self) -> None:
        with self._lock:
            if not self._stopping:
                os.eventfd_write(self._trigger, 1)

    # -- the thread ---------------------------------------------------------

    def _write(self, fd: int) -> None:
        self._writing = fd
        try:
            os.eventfd_write(fd, 1)  # may block: only this partition waits
        except InterruptedError:
            pass  # aclose() wants us gone
        except OSError as exc:
            log.debug("guest eventfd write failed: %s", exc)
        finally:
            self._writing = -1

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                os.eventfd_read(self._trigger)
                if self._sint_due and not self._stopping:
                    self._sint_due = False
                    self._write(self._sint)
                while self._once and not self._stopping:
                    key, fd = self._once.popleft()
                    self._once_keys.discard(key)
                    try:
                        self._write(fd)
                    finally:
                        os.close(fd)  # a dup of a host-made eventfd: closing it cannot block
        finally:
            with self._lock:
                if self._abandoned:  # aclose() gave up waiting: the fds are ours to close
                    self._close_fds()

    def _close_fds(self) -> None:
        while self._once:
            os.close(self._once.popleft()[1])
        os.close(self._sint)
        os.close(self._trigger)

    # -- stopping ---------------------------------------------------------------

    def _request_stop(self) -> bool:
        with self._lock:
            if self._stopping:
                return False
            self._stopping = True
            os.eventfd_write(self._trigger, 1)  # the thread reads at most this once more
            return True

    def _unblock(self) -> None:
        if self._writing >= 0:
            if self._interruptible and self._thread.ident is not None:
                signal.pthread_kill(self._thread.ident, STOP_SIGNAL)
            elif self._writing == self._sint:
                # (the SINT fd stays open until the thread is gone; a dup
                # may be closed and its number reused at any time)
                read_counter_nowait(self._sint)

    async def aclose(self) -> None:
        """Stop the thread and close every fd it holds (see the module note)."""
        if not self._request_stop():
            return
        with trio.move_on_after(STOP_DEADLINE):
            while self._thread.is_alive():
                self._unblock()
                await trio.sleep(0.002)
        self._finish()

    def close(self) -> None:
        """``aclose`` for callers outside trio (tools that made the SINT
        eventfd themselves); waits at most ``STOP_DEADLINE`` seconds."""
        if not self._request_stop():
            return
        for _ in range(int(STOP_DEADLINE / 0.002)):
            if not self._thread.is_alive():
                break
            self._unblock()
            self._thread.join(0.002)
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            if self._thread.is_alive():
                self._abandoned = True
                log.warning("a guest keeps its interrupt eventfd full; its writer thread ends when the guest lets go")
            else:
                self._close_fds()
