"""A pure-Python reference ring with the C core's API and rules.

It exists to cross-check ``csrc/ring.c``: the tests drive both with the
same operations (including a hypothesis state machine) and compare every
result, byte for byte.  It reads the layout from ``_layout`` and follows
the same validation order, so the two agree even on which error a corrupt
ring reports.  It has no atomics and is meant for one process: never use
it to talk to another one.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from ._api import Buffer, IncomingRingBase, OutgoingRingBase, PacketInfo, ReadBatch, RingStatistics
from ._layout import (
    CONTROL_SIZE,
    DESCRIPTOR,
    DESCRIPTOR_SIZE,
    FEAT_PENDING_SEND_SZ,
    FEATURE_BITS_OFFSET,
    FLAG_COMPLETION_REQUESTED,
    INTERRUPT_MASK_OFFSET,
    KNOWN_TYPES,
    MAX_LEN8,
    PENDING_SEND_SZ_OFFSET,
    READ_INDEX_OFFSET,
    TRAILER_SIZE,
    WRITE_INDEX_OFFSET,
    pad8,
)
from .errors import PacketTooLarge, RingCorrupt, RingFull

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _PyRing:
    _mem: memoryview
    data_size: int

    def _setup(self, fmt: bool) -> None:
        self._corrupt: RingCorrupt | None = None
        self._packets = self._bytes = self._commits = self._signals = self._full = 0
        if fmt:
            self._mem[:CONTROL_SIZE] = bytes(CONTROL_SIZE)
            self._put(FEATURE_BITS_OFFSET, FEAT_PENDING_SEND_SZ)
        w, r = self._get(WRITE_INDEX_OFFSET), self._get(READ_INDEX_OFFSET)
        if not self._index_ok(w):
            self._mark("index", w)
        elif not self._index_ok(r):
            self._mark("index", r)
        w = w if self._corrupt is None else 0
        r = r if self._corrupt is None else 0
        self._write_published = self._write_staged = w
        self._read_published = self._read_staged = r
        self._pending_armed = False

    # control page words
    def _get(self, off: int) -> int:
        value: int = _U32.unpack_from(self._mem, off)[0]
        return value

    def _put(self, off: int, value: int) -> None:
        _U32.pack_into(self._mem, off, value)

    def _index_ok(self, idx: int) -> bool:
        return idx < self.data_size and idx % 8 == 0

    def _mark(self, reason: str, value: int) -> RingCorrupt:
        if self._corrupt is None:
            self._corrupt = RingCorrupt(reason, value)
        return self._corrupt

    def _check(self) -> None:
        if self._corrupt is not None:
            raise self._corrupt

    def _distance(self, a: int, b: int) -> int:
        return b - a if b >= a else self.data_size - a + b

    def _to_write(self, w: int, r: int) -> int:
        return self.data_size - (w - r) if w >= r else r - w

    def _copy_in(self, off: int, data: bytes) -> int:
        first = self.data_size - off
        base = CONTROL_SIZE
        if len(data) <= first:
            self._mem[base + off : base + off + len(data)] = data
        else:
            self._mem[base + off : base + self.data_size] = data[:first]
            self._mem[base : base + len(data) - first] = data[first:]
        return (off + len(data)) % self.data_size

    def _copy_out(self, off: int, length: int) -> bytes:
        off %= self.data_size
        base = CONTROL_SIZE
        first = self.data_size - off
        if length <= first:
            return bytes(self._mem[base + off : base + off + length])
        return bytes(self._mem[base + off : base + self.data_size]) + bytes(
            self._mem[base : base + length - first]
        )

    def _peer_index(self, off: int) -> int:
        idx = self._get(off)
        if not self._index_ok(idx):
            raise self._mark("index", idx)
        return idx

    def statistics(self) -> RingStatistics:
        return RingStatistics(self._packets, self._bytes, self._commits, self._signals, self._full)

    @property
    def corrupt(self) -> bool:
        return self._corrupt is not None


class OutgoingRing(_PyRing, OutgoingRingBase):
    """Producer side, pure Python."""

    def __init__(
        self, buffer: Buffer, offset: int = 0, length: int | None = None, *, format: bool = False
    ) -> None:
        OutgoingRingBase.__init__(self, buffer, offset, length)
        self._setup(format)

    def _write(
        self, ptype: int, flags: int, trans_id: int, header: bytes, bufs: Sequence[Buffer]
    ) -> None:
        self._check()
        if len(header) % 8:
            raise ValueError("type-specific header must be a multiple of 8 bytes")
        payload = b"".join(bytes(b) for b in bufs)
        padded = pad8(len(payload))
        packet_len = DESCRIPTOR_SIZE + len(header) + padded
        total = packet_len + TRAILER_SIZE
        if packet_len // 8 > MAX_LEN8 or total > self.data_size - 8:
            raise PacketTooLarge(total, self.max_packet_total)
        w = self._write_staged
        r = self._peer_index(READ_INDEX_OFFSET)
        if self._to_write(w, r) <= total:
            self._full += 1
            raise RingFull(self._distance(self._write_published, w) + total)
        start = w
        desc = DESCRIPTOR.pack(ptype, (DESCRIPTOR_SIZE + len(header)) // 8, packet_len // 8, flags, trans_id)
        blob = desc + header + payload + bytes(padded - len(payload)) + _U64.pack(start << 32)
        self._write_staged = self._copy_in(w, blob)
        self._packets += 1
        self._bytes += total
        if self._pending_armed:
            self._put(PENDING_SEND_SZ_OFFSET, 0)
            self._pending_armed = False

    def write_many(
        self, payloads: Buffer, lengths: Any, *, trans_id0: int = 0, completion_requested: bool = False
    ) -> int:
        mem = memoryview(payloads).cast("B")
        off = 0
        for i, n in enumerate(lengths):
            try:
                self.write(mem[off : off + n], trans_id=trans_id0 + i, completion_requested=completion_requested)
            except RingFull:
                if i == 0:
                    raise
                return i
            off += n
        return len(lengths)

    def commit(self) -> bool:
        self._check()
        old = self._write_published
        if self._write_staged == old:
            return False
        self._put(WRITE_INDEX_OFFSET, self._write_staged)
        self._write_published = self._write_staged
        self._commits += 1
        mask = self._get(INTERRUPT_MASK_OFFSET)
        r = self._peer_index(READ_INDEX_OFFSET)
        if mask == 0 and r == old:
            self._signals += 1
            return True
        return False

    def revert(self) -> None:
        self._write_staged = self._write_published

    def arm_pending_send(self, needed: int) -> bool:
        self._check()
        if self._write_staged != self._write_published:
            raise ValueError("commit staged packets before arming pending_send_sz")
        want = pad8(needed)
        if needed <= 0 or want > self.data_size - 8:
            raise PacketTooLarge(needed, self.max_packet_total)
        self._put(PENDING_SEND_SZ_OFFSET, want)
        self._pending_armed = True
        r = self._peer_index(READ_INDEX_OFFSET)
        return self._to_write(self._write_published, r) > want

    def clear_pending_send(self) -> None:
        self._put(PENDING_SEND_SZ_OFFSET, 0)
        self._pending_armed = False

    @property
    def write_space(self) -> int:
        self._check()
        return self._to_write(self._write_staged, self._peer_index(READ_INDEX_OFFSET))


class IncomingRing(_PyRing, IncomingRingBase):
    """Consumer side, pure Python."""

    def __init__(
        self, buffer: Buffer, offset: int = 0, length: int | None = None, *, format: bool = False
    ) -> None:
        IncomingRingBase.__init__(self, buffer, offset, length)
        self._setup(format)

    def _peek(self) -> tuple[int, int, int, int, int, int] | None:
        self._check()
        w = self._peer_index(WRITE_INDEX_OFFSET)
        avail = self._distance(self._read_staged, w)
        if avail == 0:
            return None
        if avail < DESCRIPTOR_SIZE + TRAILER_SIZE:
            raise self._mark("short", avail)
        ptype, offset8, len8, flags, trans_id = DESCRIPTOR.unpack(self._copy_out(self._read_staged, DESCRIPTOR_SIZE))
        if offset8 < 2 or offset8 > len8:
            raise self._mark("offset8", offset8)
        if len8 * 8 + TRAILER_SIZE > avail:
            raise self._mark("length", len8)
        if ptype not in KNOWN_TYPES:
            raise self._mark("type", ptype)
        if flags & ~FLAG_COMPLETION_REQUESTED:
            raise self._mark("flags", flags)
        return ptype, flags, offset8 * 8, len8 * 8, trans_id, self._read_staged

    def _take(self, packet_len: int, ring_offset: int) -> None:
        self._read_staged = (ring_offset + packet_len + TRAILER_SIZE) % self.data_size
        self._packets += 1
        self._bytes += packet_len + TRAILER_SIZE

    def _next(self) -> tuple[int, int, int, int, int, int] | None:
        nxt = self._peek()
        if nxt is not None:
            self._take(nxt[3], nxt[5])
        return nxt

    def read_into(self, out: Buffer, max_packets: int = 1024, *, payload_only: bool = False) -> ReadBatch:
        mem = memoryview(out).cast("B")
        infos: list[PacketInfo] = []
        off = 0
        while len(infos) < max_packets:
            try:
                nxt = self._peek()
            except RingCorrupt:
                if infos:
                    break
                raise
            if nxt is None:
                break
            ptype, flags, header_len, packet_len, trans_id, ring_offset = nxt
            skip = header_len if payload_only else 0
            n = packet_len - skip
            if n > len(mem) - off:
                if not infos:
                    raise ValueError("output buffer too small for the next packet")
                break
            mem[off : off + n] = self._copy_out(ring_offset + skip, n)
            infos.append(PacketInfo(ptype, flags, trans_id, header_len, packet_len, off, n))
            off += n
            self._take(packet_len, ring_offset)
        return ReadBatch(len(infos), off, lambda: infos)

    def commit(self) -> bool:
        self._check()
        start = self._read_published
        if self._read_staged == start:
            return False
        self._put(READ_INDEX_OFFSET, self._read_staged)
        self._read_published = self._read_staged
        self._commits += 1
        if not self._get(FEATURE_BITS_OFFSET) & FEAT_PENDING_SEND_SZ:
            return False
        pending = self._get(PENDING_SEND_SZ_OFFSET)
        if pending == 0:
            return False
        pending &= ~7
        w = self._peer_index(WRITE_INDEX_OFFSET)
        free_now = self._to_write(w, self._read_published)
        freed = self._distance(start, self._read_published)
        if free_now - freed > pending or free_now <= pending:
            return False
        self._signals += 1
        return True

    def mask(self) -> None:
        self._put(INTERRUPT_MASK_OFFSET, 1)

    def unmask(self) -> bool:
        self._put(INTERRUPT_MASK_OFFSET, 0)
        return self.available > 0

    @property
    def available(self) -> int:
        self._check()
        return self._distance(self._read_staged, self._peer_index(WRITE_INDEX_OFFSET))

    def poll(self, spins: int) -> bool:
        return self.available > 0
