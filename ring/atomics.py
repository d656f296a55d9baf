"""Sequentially consistent atomics on shared memory, by byte offset.

The SynIC handshakes (message slot type / pending flag, event-flag bits)
are Dekker-style: each side stores its own word and then loads the
peer's, which needs store->load ordering on both sides, so every
operation here is seq_cst (``csrc/shmops.c``).  ``SharedWords`` wraps one
writable buffer (a guest RAM mapping) and does no bounds checking of its
own: callers check offsets and alignment first (the host through
``GuestMemory``, whose every GPA is checked; the guest on its own RAM).
"""

from __future__ import annotations

from typing import Any

from ._ring_c import ffi, lib


class SharedWords:
    """Atomic loads, stores and read-modify-writes at offsets into a buffer."""

    def __init__(self, buffer: Any) -> None:
        self._base = ffi.from_buffer(buffer)

    @property
    def address(self) -> int:
        """Where the buffer starts, for C code that indexes it itself."""
        return int(ffi.cast("uintptr_t", self._base))

    def load32(self, offset: int) -> int:
        return int(lib.pv_load32(self._base + offset))

    def store32(self, offset: int, value: int) -> None:
        lib.pv_store32(self._base + offset, value)

    def or8(self, offset: int, value: int) -> int:
        return int(lib.pv_or8(self._base + offset, value))

    def or64(self, offset: int, value: int) -> int:
        return int(lib.pv_or64(self._base + offset, value))

    def xchg64(self, offset: int, value: int) -> int:
        return int(lib.pv_xchg64(self._base + offset, value))

    def release(self) -> None:
        """Drop the reference to the buffer (its mapping may then close)."""
        self._base = None
