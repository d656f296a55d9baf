"""Ring pairs for tests, over either implementation."""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Any, NamedTuple

import ring
from ring import _layout as L

IMPLS = {
    "c": (ring.OutgoingRing, ring.IncomingRing),
    "py": (ring.PyOutgoingRing, ring.PyIncomingRing),
}


class Pair(NamedTuple):
    out: Any
    inc: Any
    mem: memoryview


def make_pair(impl: str, data_size: int = 4096, *, start: int = 0, buffer: Any = None, offset: int = 0) -> Pair:
    """A formatted ring with both indices at ``start``; producer and consumer."""
    total = L.CONTROL_SIZE + data_size
    if buffer is None:
        buffer = bytearray(total + offset)
    mem = memoryview(buffer).cast("B")[offset : offset + total]
    out_cls, inc_cls = IMPLS[impl]
    out_cls(mem, format=True)  # format only
    struct.pack_into("<II", mem, 0, start, start)
    return Pair(out_cls(mem), inc_cls(mem), mem)


def control(mem: memoryview) -> dict[str, int]:
    w, r, mask, pending = struct.unpack_from("<IIII", mem, 0)
    (feat,) = struct.unpack_from("<I", mem, 64)
    return {"write": w, "read": r, "mask": mask, "pending": pending, "features": feat}


def payload_of(seed: int, n: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class GuardedBuffer:
    """``size`` bytes between two PROT_NONE pages: any access outside the
    ring faults (and kills the test run loudly) instead of going unseen."""

    def __init__(self, size: int) -> None:
        page = mmap.PAGESIZE
        self._map = mmap.mmap(-1, size + 2 * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        for addr in (base, base + page + size):
            if _libc.mprotect(addr, page, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
        self.view = memoryview(self._map)[page : page + size]
