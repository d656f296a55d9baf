"""The queue layer's C entry points (``csrc/queue.c``) for Python.

``vmbus.queue`` is the layer's face for devices; this module only hands it
the C calls over ``IncomingRing`` / ``OutgoingRing`` objects of the C core:

- ``PollSet(rings).poll(usec)``: spin (GIL released) over several incoming
  rings for up to ``usec`` microseconds; the index of one with data, or -1.
- ``Server``: one ``pv_server`` (``pv_serve`` over a ring pair with a C
  handler, a kick and a stop eventfd, counters kept in C).  ``echo_server``
  makes one with the built-in echo handler (tests and benchmarks).
- ``Waiter``: the same ``pv_server`` without a handler, for a peer that
  reads and writes its rings itself but waits the layer's way:
  ``wait_readable()`` (mask, poll, unmask and re-check, sleep) and
  ``wait_writable(needed)`` (arm pending_send_sz, re-check, sleep), both
  in C with the GIL released (the ring benchmark's processes).
- ``stage_counted`` / ``reap_echoes``: the guest half of that echo: stage
  requests whose payload is their transaction id, reap the answers.

A device's own handler, builder and decoder live in its own extension
(built with ``ring.build.device_module``); its C calls ``pv_serve``,
``pv_stage`` and ``pv_reap`` there, over the handles ``c_address`` gives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ._cring import IncomingRing, OutgoingRing
from ._ring_c import ffi, lib
from .errors import RingFull

__all__ = ["HANDLED", "HANDLED_PUBLISH", "NOT_MINE", "NO_ROOM", "SERVE_CORRUPT", "SERVE_PUNT",
           "SERVE_SIGNAL", "SERVE_STOPPED", "SERVER_COUNTERS", "EchoReaper", "PollSet", "Server", "Waiter",
           "echo_server", "reap_echoes", "stage_counted"]

# What a handler says about one packet (queue.h PV_*).
HANDLED: int = lib.PV_HANDLED
NOT_MINE: int = lib.PV_NOT_MINE
NO_ROOM: int = lib.PV_NO_ROOM
HANDLED_PUBLISH: int = lib.PV_HANDLED_PUBLISH
# Why pv_serve (or a wait) returned: bits (queue.h PV_SERVE_*).
SERVE_SIGNAL: int = lib.PV_SERVE_SIGNAL
SERVE_PUNT: int = lib.PV_SERVE_PUNT
SERVE_CORRUPT: int = lib.PV_SERVE_CORRUPT
SERVE_STOPPED: int = lib.PV_SERVE_STOPPED
# The counters a pv_server keeps (its struct fields of the same names).
SERVER_COUNTERS = ("served", "punted", "publishes", "signals", "wakeups", "sleeps", "polls_hit", "ring_full_waits")


class PollSet:
    """Several incoming rings polled together: ``poll(usec)`` spins (GIL
    released) up to ``usec`` microseconds over them and returns the index
    of the first with data (or with a corrupt index, which its next read
    reports), or -1 when nothing came."""

    def __init__(self, rings: Sequence[IncomingRing]) -> None:
        self.rings = list(rings)
        self._handles = ffi.new("pv_ring *[]", [ffi.cast("pv_ring *", r.c_address) for r in self.rings])

    def poll(self, usec: int) -> int:
        return int(lib.pv_ring_poll_many(self._handles, len(self.rings), usec))


class Waiter:
    """A ``pv_server`` over an incoming and an outgoing ring with the
    layer's two waits and nothing else: ``wait_readable()`` returns 0 once
    ``incoming`` has data (its interrupt masked: drain it and commit before
    waiting again), ``wait_writable(needed)`` 0 once ``outgoing`` has more
    than ``needed`` free bytes; otherwise SERVE_STOPPED (``stop()``, from
    any thread) or SERVE_CORRUPT.  Both sleep on a dup of ``kick_fd`` (an
    eventfd) and spin ``spin_us`` first; the counters are the layer's."""

    def __init__(self, incoming: IncomingRing, outgoing: OutgoingRing, kick_fd: int, *, spin_us: int = 0,
                 room_needed: int = 0) -> None:
        self._rings = (incoming, outgoing)  # their handles must outlive ours
        s = self._s = ffi.new("pv_server *")
        s.inbound = ffi.cast("pv_ring *", incoming.c_address)
        s.outbound = ffi.cast("pv_ring *", outgoing.c_address)
        self._kick = os.dup(kick_fd)  # ours: the owner may close its fd while we poll
        try:
            self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            os.close(self._kick)
            raise
        s.kick_fd, s.stop_fd = self._kick, self._stop
        s.signal_fd = -1
        s.spin_us, s.room_needed = spin_us, room_needed

    def wait_readable(self) -> int:
        return int(lib.pv_wait_readable(self._s))

    def wait_writable(self, needed: int) -> int:
        return int(lib.pv_wait_writable(self._s, needed))

    def rearm(self) -> None:
        """Before waiting or serving again after a stop: clear the stop request."""
        self._s.stop = 0
        try:
            os.eventfd_read(self._stop)
        except BlockingIOError:
            pass

    def stop(self) -> None:
        self._s.stop = 1
        os.eventfd_write(self._stop, 1)

    def counters(self) -> dict[str, int]:
        return {name: int(getattr(self._s, name)) for name in SERVER_COUNTERS}

    def close(self) -> None:
        os.close(self._kick)
        os.close(self._stop)


class Server(Waiter):
    """A ``pv_server`` over an incoming (requests) and an outgoing (answers)
    ring: ``serve()`` runs ``pv_serve`` until it returns (a thread may call
    it: cffi releases the GIL), ``stop()`` (any thread) makes it return
    ``SERVE_STOPPED``.  ``handle`` is a C function pointer of type
    ``pv_handler`` from the extension that owns it, ``ctx`` its argument.
    ``signal_fd``: the peer's eventfd, written by C when a commit says so
    (None: ``serve`` returns ``SERVE_SIGNAL`` and the caller signals).
    ``room_needed``: the free bytes one answer needs (PV_NO_ROOM waits for
    that much)."""

    def __init__(self, incoming: IncomingRing, outgoing: OutgoingRing, kick_fd: int, *, handle: Any,
                 ctx: Any = None, signal_fd: int | None = None, spin_us: int = 0, batch_max: int = 0,
                 room_needed: int = 0) -> None:
        super().__init__(incoming, outgoing, kick_fd, spin_us=spin_us, room_needed=room_needed)
        self._keep: Any = ctx  # (a cffi object ``ctx`` points into must live as long)
        s = self._s
        s.handle = ffi.cast("pv_handler", handle)
        s.ctx = ffi.NULL if ctx is None else ffi.cast("void *", ctx)
        s.signal_fd = -1 if signal_fd is None else signal_fd
        s.batch_max = batch_max

    def serve(self) -> int:
        """``pv_serve`` once: the SERVE_* bits it returned for."""
        return int(lib.pv_serve(self._s))


def echo_server(incoming: IncomingRing, outgoing: OutgoingRing, kick_fd: int, *, pace_spins: int = 0,
                **kwargs: Any) -> Server:
    """A ``Server`` answering every request with its own payload (up to 512
    bytes), all in C; ``pace_spins``: spin a pseudo-random 0..pace_spins
    pause rounds before each answer."""
    pacing = ffi.new("pv_echo_pacing *", (pace_spins, 0x9E3779B9))
    return Server(incoming, outgoing, kick_fd, handle=ffi.addressof(lib, "pv_echo_handler"), ctx=pacing,
                  room_needed=16 + 512 + 8 + 8, **kwargs)


def stage_counted(ring: OutgoingRing, trans_id0: int, count: int) -> int:
    """Stage up to ``count`` in-band requests asking for completion, ids
    ``trans_id0``.., each carrying its id as 8 payload bytes; returns how
    many went in (unpublished: the caller commits).  RingFull only when not
    even one fitted."""
    staged, needed = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    rc = lib.pv_stage_counted(ffi.cast("pv_ring *", ring.c_address), trans_id0, count, staged, needed)
    if rc == lib.PV_CORRUPT:
        raise ring.corruption()
    if rc == lib.PV_FULL and staged[0] == 0:
        raise RingFull(needed[0])
    if rc not in (lib.PV_OK, lib.PV_FULL):
        raise ValueError(f"a request the ring cannot take (rc={rc})")
    return int(staged[0])


class EchoReaper:
    """Reap echo answers into a reused array: ``reap()`` returns the list of
    (trans_id, first payload word, packet type) taken; the caller commits."""

    def __init__(self, ring: IncomingRing, capacity: int = 256) -> None:
        self._ring = ring
        self._handle = ffi.cast("pv_ring *", ring.c_address)
        self._replies = ffi.new("pv_echo_reply[]", capacity)
        self._n = ffi.new("uint32_t *")

    def reap(self) -> list[tuple[int, int, int]]:
        rc = lib.pv_echo_reap(self._handle, self._replies, len(self._replies), self._n)
        out = [(r.trans_id, r.first_word, r.type) for r in self._replies[0 : self._n[0]]]
        if rc == lib.PV_CORRUPT and not out:
            raise self._ring.corruption()
        return out


def reap_echoes(ring: IncomingRing, capacity: int = 256) -> EchoReaper:
    """An ``EchoReaper`` over ``ring``."""
    return EchoReaper(ring, capacity)

