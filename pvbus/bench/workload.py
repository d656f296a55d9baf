"""The message stream every transport moves, and how to check it arrived.

Message ``k`` of size ``s`` is bytes ``[k*s mod L, +s)`` of one seeded random
buffer of ``L`` bytes (L a multiple of every size used), so producers slice
it without building anything per message and a lost, duplicated or
reordered message changes the CRC-32 of what the consumer saw.  Both sides
report the count and the chained CRC-32 of the payloads in arrival order;
``expected_crc`` computes what that must be.
"""

from __future__ import annotations

import random
import zlib
from functools import lru_cache

STREAM_BYTES = 4 << 20  # L: 4 MiB, a multiple of 64, 4096 and 65536


@lru_cache(maxsize=2)
def stream(seed: int = 1) -> bytes:
    """L random bytes plus one maximum-size message of run-off, so that any
    contiguous batch that starts inside L can be sliced without wrapping."""
    base = random.Random(seed).randbytes(STREAM_BYTES)
    return base + base[: 1 << 20]


def message(k: int, size: int, seed: int = 1) -> memoryview:
    off = (k * size) % STREAM_BYTES
    return memoryview(stream(seed))[off : off + size]


def batch(first: int, count: int, size: int, seed: int = 1) -> memoryview:
    """Messages first .. first+count-1 back to back (count*size <= 1 MiB)."""
    off = (first * size) % STREAM_BYTES
    return memoryview(stream(seed))[off : off + count * size]


def expected_crc(count: int, size: int, seed: int = 1) -> int:
    per_lap = STREAM_BYTES // size
    laps, rest = divmod(count, per_lap)
    whole = stream(seed)[:STREAM_BYTES]
    crc = 0
    for _ in range(laps):
        crc = zlib.crc32(whole, crc)
    return zlib.crc32(whole[: rest * size], crc)
