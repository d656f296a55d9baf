"""The rings backed by the C core (``csrc/ring.c`` via cffi, API mode).

Each method is one C call plus the argument plumbing; the per-packet work
of batches (``write_many``, ``read_into``) stays in C.  cffi releases the
GIL around every call, so a ring may be driven from a worker thread; one
ring side must still be used by one thread at a time.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from ._api import (
    Buffer,
    IncomingRingBase,
    OutgoingRingBase,
    Packet,
    PacketInfo,
    ReadBatch,
    RingStatistics,
)
from ._layout import CONTROL_SIZE
from ._ring_c import ffi, lib
from .errors import CORRUPT_REASONS, PacketTooLarge, RingCorrupt, RingFull

# The per-packet path (read_packet/poll_packet) is the round-trip latency
# of every request/response device, so it avoids per-field cffi reads: the
# C fills a pv_packet and one struct unpack reads it (tests pin this format
# to ring.h), and packets are built with tuple.__new__ directly.
PV_PACKET = struct.Struct("<HHII4xQI4x")  # type, flags, header_len, packet_len, trans_id, ring_offset
_OK, _EMPTY_RC = lib.PV_OK, lib.PV_EMPTY
_new_tuple = tuple.__new__
# Below this size a payload that is not bytes (a view of another ring, say)
# is copied to bytes for the C call: cheaper than pinning it with
# ffi.from_buffer (measured 0.1 vs 0.4 us at 64 B).
SMALL_COPY = 512


def _c_payload(payload: Buffer) -> Any:
    """A payload that is not bytes, as the C call takes it."""
    if len(payload) <= SMALL_COPY:
        return bytes(payload)
    return ffi.from_buffer(payload)


_EMPTY = memoryview(b"")


class _CRing:
    _handle: Any

    def _attach(self, mem: memoryview, fmt: bool) -> None:
        # Only the address is kept.  ``mem`` (held by the ring as ``_mem``)
        # already pins the memory: its export keeps an mmap from being closed
        # and a bytearray from being resized.  A cffi buffer kept for the
        # ring's life would add an export *on the memoryview*, and CPython
        # before 3.12 crashes when the cycle collector clears an exported
        # memoryview (python/cpython#77894): a ring in a reference cycle
        # took the process down at exit.
        with ffi.from_buffer(mem, require_writable=True) as cbuf:
            base = ffi.cast("uint8_t *", cbuf)
        self._handle = ffi.new("pv_ring *")
        rc = lib.pv_ring_attach(self._handle, base, len(mem), int(fmt))
        if rc == lib.PV_BAD_ARGUMENT:
            raise ValueError("ring buffer is not 8-aligned in memory or has a bad length")
        # PV_CORRUPT at attach is sticky in the handle: the first use raises.

    def corruption(self) -> RingCorrupt:
        """The error describing why this ring is corrupt (also for a caller
        whose own C found out, through ``c_address``)."""
        h = self._handle
        reason = h.corrupt_reason
        name = CORRUPT_REASONS[reason] if reason < len(CORRUPT_REASONS) else str(reason)
        return RingCorrupt(name, h.corrupt_value)

    def statistics(self) -> RingStatistics:
        h = self._handle
        return RingStatistics(h.packets, h.bytes, h.commits, h.signals, h.full_events)

    @property
    def corrupt(self) -> bool:
        return bool(self._handle.corrupt_reason)

    @property
    def c_address(self) -> int:
        """Address of this side's ``pv_ring`` handle, for another cffi module
        built with ``ring.h`` (a device's C fast path).  Valid while this
        object lives; its user must be the ring side's only user meanwhile."""
        return int(ffi.cast("uintptr_t", self._handle))


class OutgoingRing(_CRing, OutgoingRingBase):
    """Producer side of one ring, C core."""

    def __init__(
        self, buffer: Buffer, offset: int = 0, length: int | None = None, *, format: bool = False
    ) -> None:
        OutgoingRingBase.__init__(self, buffer, offset, length)
        self._attach(self._mem, format)
        self._iov_cap = 0
        self._iov: Any = None
        self._needed = ffi.new("uint32_t *")
        self._written = ffi.new("uint32_t *")

    def _raise(self, rc: int) -> None:
        if rc == lib.PV_FULL:
            raise RingFull(self._needed[0])
        if rc == lib.PV_TOO_LARGE:
            raise PacketTooLarge(self._needed[0], self.max_packet_total)
        if rc == lib.PV_CORRUPT:
            raise self.corruption()
        raise ValueError(f"bad ring write arguments (rc={rc})")

    def _write(
        self, ptype: int, flags: int, trans_id: int, header: bytes, bufs: Sequence[Buffer]
    ) -> None:
        n = len(bufs)
        if n > self._iov_cap:
            self._iov_cap = max(n, 4)
            self._iov = ffi.new("pv_iov[]", self._iov_cap)
        iov = self._iov
        keep = []
        for i, b in enumerate(bufs):
            cb = ffi.from_buffer(b)
            keep.append(cb)
            iov[i].base = cb
            iov[i].len = len(cb)
        chdr = ffi.from_buffer(header) if header else ffi.NULL
        rc = lib.pv_ring_write(
            self._handle, ptype, flags, trans_id, chdr, len(header), iov, n, self._needed
        )
        if rc:
            self._raise(rc)

    def write(
        self,
        payload: Buffer | Sequence[Buffer],
        *,
        trans_id: int = 0,
        completion_requested: bool = False,
        packet_type: int = 6,
        header: bytes = b"",
    ) -> None:
        # Fast path, one C call: a single contiguous payload and no
        # type-specific header.  Everything else goes the general way.
        if header or isinstance(payload, (list, tuple)):
            return OutgoingRingBase.write(
                self, payload, trans_id=trans_id, completion_requested=completion_requested,
                packet_type=packet_type, header=header,
            )
        buf = payload if type(payload) is bytes else _c_payload(payload)
        rc = lib.pv_ring_write1(
            self._handle, packet_type, 1 if completion_requested else 0, trans_id, buf, len(buf), self._needed
        )
        if rc:
            self._raise(rc)

    write.__doc__ = OutgoingRingBase.write.__doc__

    def send(self, payload: Buffer, *, trans_id: int = 0, completion_requested: bool = False) -> bool:
        buf = payload if type(payload) is bytes else _c_payload(payload)
        rc: int = lib.pv_ring_send1(
            self._handle, 6, 1 if completion_requested else 0, trans_id, buf, len(buf), self._needed
        )
        if rc < 0:
            self._raise(-rc)
        return rc == 1

    send.__doc__ = OutgoingRingBase.send.__doc__

    def write_many(
        self,
        payloads: Buffer,
        lengths: Any,
        *,
        trans_id0: int = 0,
        completion_requested: bool = False,
    ) -> int:
        """Stage in-band packets whose payloads lie back to back in ``payloads``
        with lengths from ``lengths`` (an ``array('I')`` or cffi ``uint32_t[]``).

        Returns how many were staged; stops quietly when the ring fills
        (``RingFull`` only if not even the first fits).
        """
        lens = ffi.from_buffer("uint32_t[]", lengths) if not isinstance(lengths, ffi.CData) else lengths
        n = len(lens)
        if n == 0:
            return 0
        rc = lib.pv_ring_write_many(
            self._handle,
            6,
            1 if completion_requested else 0,
            trans_id0,
            ffi.from_buffer(payloads),
            lens,
            n,
            self._written,
            self._needed,
        )
        written: int = self._written[0]
        if rc and (written == 0 or rc != lib.PV_FULL):
            self._raise(rc)
        return written

    def commit(self) -> bool:
        """Publish all staged packets; True when the reader must be signalled."""
        rc: int = lib.pv_ring_commit_write(self._handle)
        if rc < 0:
            raise self.corruption()
        return rc == 1

    def revert(self) -> None:
        """Forget everything staged since the last commit."""
        lib.pv_ring_revert_write(self._handle)

    def arm_pending_send(self, needed: int) -> bool:
        """Ask the reader to signal once ``needed`` bytes are free.

        Returns True if they already are (retry now instead of waiting).
        Commit staged packets first.
        """
        rc: int = lib.pv_ring_arm_pending_send(self._handle, needed)
        if rc == -lib.PV_TOO_LARGE:
            raise PacketTooLarge(needed, self.max_packet_total)
        if rc == -lib.PV_CORRUPT:
            raise self.corruption()
        if rc < 0:
            raise ValueError("commit staged packets before arming pending_send_sz")
        return rc == 1

    def clear_pending_send(self) -> None:
        lib.pv_ring_clear_pending_send(self._handle)

    @property
    def write_space(self) -> int:
        """Free bytes now (a packet needs strictly more than its size)."""
        n: int = lib.pv_ring_write_space(self._handle)
        if n < 0:
            raise self.corruption()
        return n


class IncomingRing(_CRing, IncomingRingBase):
    """Consumer side of one ring, C core."""

    def __init__(
        self, buffer: Buffer, offset: int = 0, length: int | None = None, *, format: bool = False
    ) -> None:
        IncomingRingBase.__init__(self, buffer, offset, length)
        self._attach(self._mem, format)
        self._pkt = ffi.new("pv_packet *")
        self._pkt_fields = ffi.buffer(self._pkt)
        self._pkts_cap = 0
        self._pkts: Any = None
        self._n = ffi.new("uint32_t *")
        self._used = ffi.new("size_t *")

    def read_packet(self) -> Packet | None:
        # Same result as the base class (which builds on _next), fewer steps:
        # this is the per-packet path, so the C ring needs no _next at all.
        return self._packet(lib.pv_ring_next(self._handle, self._pkt))

    def poll_packet(self, spins: int) -> Packet | None:
        return self._packet(lib.pv_ring_poll_next(self._handle, spins, self._pkt))

    poll_packet.__doc__ = IncomingRingBase.poll_packet.__doc__

    def _packet(self, rc: int) -> Packet | None:
        if rc != _OK:
            if rc == _EMPTY_RC:
                return None
            raise self.corruption()
        ptype, flags, hlen, plen, trans_id, off = PV_PACKET.unpack_from(self._pkt_fields)
        if off + plen <= self.data_size:
            mem = self._mem
            base = CONTROL_SIZE + off
            header = _EMPTY if hlen == 16 else mem[base + 16 : base + hlen]
            return _new_tuple(Packet, (ptype, flags, trans_id, header, mem[base + hlen : base + plen]))
        return IncomingRingBase.packet_from(self, ptype, flags, hlen, plen, trans_id, off)

    def read_into(self, out: Buffer, max_packets: int = 1024, *, payload_only: bool = False) -> ReadBatch:
        """Take up to ``max_packets`` packets, copying them back to back into
        ``out`` (whole packets, or with ``payload_only`` just what follows
        offset8).  Stops early when ``out`` is full; an empty ring gives a
        batch of 0.  Commit afterwards."""
        if max_packets > self._pkts_cap:
            self._pkts_cap = max_packets
            self._pkts = ffi.new("pv_packet[]", max_packets)
        pkts = self._pkts
        cout = ffi.from_buffer(out, require_writable=True)
        rc = lib.pv_ring_read_many(
            self._handle, cout, len(cout), int(payload_only), pkts, max_packets, self._n, self._used
        )
        count = self._n[0]
        if rc == lib.PV_CORRUPT and count == 0:
            raise self.corruption()
        if rc == lib.PV_NO_SPACE:
            raise ValueError("output buffer too small for the next packet")

        def describe() -> list[PacketInfo]:
            infos = []
            for i in range(count):
                p = pkts[i]
                skip = p.header_len if payload_only else 0
                infos.append(
                    PacketInfo(
                        p.type, p.flags, p.trans_id, p.header_len, p.packet_len,
                        p.out_offset, p.packet_len - skip,
                    )
                )
            return infos

        return ReadBatch(count, self._used[0], describe)

    def commit(self) -> bool:
        """Release every packet taken so far; True when a writer blocked on
        pending_send_sz must be signalled."""
        rc: int = lib.pv_ring_commit_read(self._handle)
        if rc < 0:
            raise self.corruption()
        return rc == 1

    def mask(self) -> None:
        """Tell the writer not to signal: we are draining or polling."""
        lib.pv_ring_mask(self._handle)

    def unmask(self) -> bool:
        """Clear the mask and re-check; True means data arrived meanwhile
        (no signal is coming for it: keep draining)."""
        n: int = lib.pv_ring_unmask(self._handle)
        if n < 0:
            raise self.corruption()
        return n > 0

    @property
    def available(self) -> int:
        """Bytes published by the writer and not yet taken."""
        n: int = lib.pv_ring_read_available(self._handle)
        if n < 0:
            raise self.corruption()
        return n

    def poll(self, spins: int) -> bool:
        """Spin (in C, GIL released) up to ``spins`` times for data."""
        n: int = lib.pv_ring_poll(self._handle, spins)
        if n < 0:
            raise self.corruption()
        return n > 0
