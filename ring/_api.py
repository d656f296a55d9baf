"""The public face shared by the C ring and the pure-Python reference ring.

Both implementations subclass these bases and supply a handful of
primitives (stage one packet, publish, take the next descriptor, ...); the
convenience methods built on them (completions, GPA-direct packets,
zero-copy iteration) are written once, here.

Zero-copy caveat, as in openvmm's ``DataPacket::reader``: a ``Packet``'s
``payload`` is a view of shared memory that the peer can still change
until the read is committed.  Copy before you validate anything in it; the
descriptor fields of a ``Packet`` are already a private, validated copy.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

try:  # 3.12+
    from collections.abc import Buffer  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - 3.11
    Buffer: TypeAlias = bytes | bytearray | memoryview  # type: ignore[no-redef]

from ._layout import (
    CONTROL_SIZE,
    DESCRIPTOR_SIZE,
    FLAG_COMPLETION_REQUESTED,
    GPA_DIRECT_HEADER,
    GPA_RANGE_HEAD,
    PAGE_SIZE,
    TRAILER_SIZE,
    PacketType,
)


class GpaRange(NamedTuple):
    """One ``gpa_range``: ``byte_count`` bytes from ``byte_offset`` into the
    first of ``pfns`` (4 KiB guest page frame numbers)."""

    byte_count: int
    byte_offset: int
    pfns: Sequence[int]

    def encode(self) -> bytes:
        return GPA_RANGE_HEAD.pack(self.byte_count, self.byte_offset) + struct.pack(
            f"<{len(self.pfns)}Q", *self.pfns
        )


def encode_gpa_direct_header(ranges: Sequence[GpaRange]) -> bytes:
    """The type-9 header after the descriptor: reserved, count, ranges."""
    return GPA_DIRECT_HEADER.pack(0, len(ranges)) + b"".join(r.encode() for r in ranges)


class Packet(NamedTuple):
    """A packet handed out by ``IncomingRing``.

    ``header`` is the type-specific header between descriptor and payload
    (empty for in-band and completion packets); ``payload`` includes the
    padding to 8 bytes, so protocols carry their own exact lengths.
    """

    type: int
    flags: int
    trans_id: int
    header: memoryview | bytes
    payload: memoryview | bytes

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & FLAG_COMPLETION_REQUESTED)


class PacketInfo(NamedTuple):
    """Where one packet of a ``read_into`` batch landed in the caller's buffer."""

    type: int
    flags: int
    trans_id: int
    header_len: int  # offset8 * 8, descriptor included
    packet_len: int  # len8 * 8, trailer excluded
    out_offset: int
    out_len: int


@dataclass(frozen=True, slots=True)
class RingStatistics:
    """Private counters of one side of one ring (never in shared memory)."""

    packets: int
    bytes: int
    commits: int
    signals: int
    full_events: int


class ReadBatch:
    """Result of ``IncomingRing.read_into``: how many packets, how many bytes,
    and (built on demand, it costs per packet) where each one went."""

    __slots__ = ("count", "nbytes", "_describe", "_infos")

    def __init__(self, count: int, nbytes: int, describe: Callable[[], list[PacketInfo]]) -> None:
        self.count = count
        self.nbytes = nbytes
        self._describe = describe
        self._infos: list[PacketInfo] | None = None

    @property
    def packets(self) -> list[PacketInfo]:
        if self._infos is None:
            self._infos = self._describe()
        return self._infos


def _ring_region(buffer: Buffer, offset: int, length: int | None) -> memoryview:
    mem = memoryview(buffer).cast("B")
    if mem.readonly:
        raise ValueError("a ring needs a writable buffer")
    if length is None:
        length = len(mem) - offset
    if offset < 0 or offset % 8 or offset + length > len(mem):
        raise ValueError(f"ring at {offset}+{length} does not lie 8-aligned inside a {len(mem)}-byte buffer")
    if length <= CONTROL_SIZE or (length - CONTROL_SIZE) % PAGE_SIZE:
        raise ValueError(f"ring length {length} is not 4096 + a non-zero multiple of 4096")
    return mem[offset : offset + length]


class _RingBase:
    def __init__(self, buffer: Buffer, offset: int = 0, length: int | None = None) -> None:
        self._mem = _ring_region(buffer, offset, length)
        self.data_size = len(self._mem) - CONTROL_SIZE

    @property
    def max_packet_total(self) -> int:
        """Largest packet plus trailer this ring can ever take."""
        return self.data_size - 8

    @property
    def max_inband_payload(self) -> int:
        """Largest in-band payload one packet can carry."""
        return self.max_packet_total - DESCRIPTOR_SIZE - TRAILER_SIZE

    def control(self) -> dict[str, int]:
        """The control page's words as they are now (for inspection only:
        plain reads, no ordering, values the peer may be changing)."""
        w, r, mask, pending = struct.unpack_from("<IIII", self._mem, 0)
        (features,) = struct.unpack_from("<I", self._mem, 64)
        return {"write_index": w, "read_index": r, "interrupt_mask": mask, "pending_send_sz": pending,
                "feature_bits": features, "data_size": self.data_size}

    def _data_view(self, offset: int, length: int) -> memoryview | bytes:
        """Zero-copy view of data-area bytes, or a copy where they wrap."""
        start = CONTROL_SIZE + offset
        if offset + length <= self.data_size:
            return self._mem[start : start + length]
        first = self.data_size - offset
        return bytes(self._mem[start:]) + bytes(self._mem[CONTROL_SIZE : CONTROL_SIZE + length - first])


class OutgoingRingBase(_RingBase):
    """Producer side: stage packets, then publish them with one ``commit``."""

    def _write(
        self, ptype: int, flags: int, trans_id: int, header: bytes, bufs: Sequence[Buffer]
    ) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(
        self,
        payload: Buffer | Sequence[Buffer],
        *,
        trans_id: int = 0,
        completion_requested: bool = False,
        packet_type: int = 6,  # PacketType.DATA_INBAND
        header: bytes = b"",
    ) -> None:
        """Stage one packet; ``payload`` may be a gather list of buffers.

        Raises ``RingFull`` (retry after the reader frees space),
        ``PacketTooLarge`` or ``RingCorrupt``.
        """
        bufs = payload if isinstance(payload, (list, tuple)) else (payload,)
        flags = FLAG_COMPLETION_REQUESTED if completion_requested else 0
        self._write(int(packet_type), flags, trans_id, header, bufs)

    def send(self, payload: Buffer, *, trans_id: int = 0, completion_requested: bool = False) -> bool:
        """Stage one in-band packet and publish it at once (the "send one now"
        path); returns whether the reader must be signalled.  Anything staged
        before is published with it."""
        self.write(payload, trans_id=trans_id, completion_requested=completion_requested)
        return self.commit()  # type: ignore[attr-defined, no-any-return]

    def write_completion(self, trans_id: int, payload: Buffer | Sequence[Buffer] = b"") -> None:
        """Stage a completion (type 0xB) answering ``trans_id``."""
        self.write(payload, trans_id=trans_id, packet_type=PacketType.COMPLETION)

    def write_gpa_direct(
        self, ranges: Sequence[GpaRange], payload: Buffer | Sequence[Buffer], *, trans_id: int
    ) -> None:
        """Stage a GPA-direct packet (type 9): a range list naming guest pages,
        then the in-band request.  Completion is always requested, as Linux
        and DPDK do for this type."""
        if not ranges:
            raise ValueError("a GPA-direct packet needs at least one range")
        self.write(
            payload,
            trans_id=trans_id,
            completion_requested=True,
            packet_type=PacketType.DATA_USING_GPA_DIRECT,
            header=encode_gpa_direct_header(ranges),
        )


class IncomingRingBase(_RingBase):
    """Consumer side: take packets (in place or copied), then ``commit``."""

    def _next(self) -> tuple[int, int, int, int, int, int] | None:  # pragma: no cover - abstract
        """(type, flags, header_len, packet_len, trans_id, ring_offset) or None."""
        raise NotImplementedError

    def read_packet(self) -> Packet | None:
        """Take the next packet, zero-copy where it does not wrap; None if empty."""
        nxt = self._next()
        if nxt is None:
            return None
        return self.packet_from(*nxt)

    def packet_from(
        self, ptype: int, flags: int, header_len: int, packet_len: int, trans_id: int, ring_offset: int
    ) -> Packet:
        data_size = self.data_size
        hdr_start = (ring_offset + DESCRIPTOR_SIZE) % data_size
        pay_start = (ring_offset + header_len) % data_size
        return Packet(
            ptype,
            flags,
            trans_id,
            self._data_view(hdr_start, header_len - DESCRIPTOR_SIZE),
            self._data_view(pay_start, packet_len - header_len),
        )

    def poll_packet(self, spins: int) -> Packet | None:
        """Spin up to ``spins`` times for data, then take one packet (or None)."""
        if not self.poll(spins):  # type: ignore[attr-defined]
            return None
        return self.read_packet()

    def __iter__(self) -> Iterator[Packet]:
        """Take packets until the ring is empty (commit afterwards)."""
        while (pkt := self.read_packet()) is not None:
            yield pkt
