"""The host's one window on guest RAM: every access is bounds-checked here.

The guest owns its RAM (a sealed memfd) and hands the fd to the host once.
A guest physical address (GPA) is an offset into it; a PFN is GPA >> 12.
Nothing else in the host does arithmetic on guest memory: it asks this
accessor for a view of a GPA range, of a list of pages, or of the atomics
the SynIC pages need, and gets ``GuestMemoryError`` for anything outside
the RAM, overflowing, or malformed.  The error is the guest's fault and is
answered with a status, never a crash.

The RAM fd itself is checked before it is mapped: it must be a memfd (a
regular, unlinked file that /proc/self/fd names "/memfd:...") sealed
against shrinking.  Any other file could be truncated under the mapping
(SIGBUS on the next access) or live on a file system whose page faults the
guest serves (FUSE): a fault there would stall the host's thread.
"""


from __future__ import annotations

import fcntl
import gc
import os
import stat
from collections.abc import Sequence

from ring import PAGE_SIZE, SharedMemory, SharedWords

PAGE_SHIFT = 12  # PAGE_SIZE is the ring's, the one page size


class GuestMemoryError(ValueError):
    """Guest gave us an address, page number or length outside its RAM."""


def check_memfd(fd: int) -> None:
    """Refuse (GuestMemoryError) anything but a memfd sealed against shrinking."""
    try:
        st = os.fstat(fd)
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise GuestMemoryError(f"guest RAM fd: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0 or not name.startswith("/memfd:"):
        raise GuestMemoryError(f"guest RAM is {name or 'unknown'}, not a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise GuestMemoryError("guest RAM memfd is not sealed against shrinking")


class GuestMemory:
    """A mapping of the guest's RAM fd, with checked accessors."""

    def __init__(self, fd: int, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"guest RAM size {size} is not a positive multiple of {PAGE_SIZE}")
        check_memfd(fd)
        self._shm = SharedMemory.attach(fd, size)  # refuses unsealed or short memory
        self.size = size
        self.pages = size >> PAGE_SHIFT
        self._view = memoryview(self._shm.buf)
        self._words = SharedWords(self._shm.buf)

    @property
    def fd(self) -> int:
        return self._shm.fd

    @property
    def c_address(self) -> int:
        """Where the RAM is mapped, for C fast paths: they index it only
        through ``vmbus/csrc/guest_pages.h``, which applies the same checks
        as ``iovec``.  Valid until ``close``."""
        return self._words.address

    def check_range(self, gpa: int, length: int) -> None:
        # Overflow-safe: gpa > size or length > size - gpa (never gpa + length).
        if gpa < 0 or length < 0 or gpa > self.size or length > self.size - gpa:
            raise GuestMemoryError(f"GPA range {gpa:#x}+{length:#x} outside guest RAM of {self.size:#x}")

    def check_pfn(self, pfn: int) -> None:
        if not 0 <= pfn < self.pages:
            raise GuestMemoryError(f"PFN {pfn:#x} outside guest RAM ({self.pages} pages)")

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of ``length`` bytes at ``gpa``."""
        self.check_range(gpa, length)
        return self._view[gpa : gpa + length]

    def contiguous_pages(self, pfns: Sequence[int]) -> memoryview:
        """One view over pages that must be physically consecutive (ring GPADLs)."""
        if not pfns:
            raise GuestMemoryError("empty page list")
        for i, pfn in enumerate(pfns):
            self.check_pfn(pfn)
            if pfn != pfns[0] + i:
                raise GuestMemoryError("pages are not contiguous")
        return self.view(pfns[0] << PAGE_SHIFT, len(pfns) << PAGE_SHIFT)

    def iovec(self, pfns: Sequence[int], byte_offset: int, byte_count: int) -> list[memoryview]:
        """Views covering ``byte_count`` bytes from ``byte_offset`` into the first
        of ``pfns``: one per run of consecutive pages (for preadv/pwritev)."""
        if byte_count <= 0 or not 0 <= byte_offset < PAGE_SIZE:
            raise GuestMemoryError(f"bad range: offset {byte_offset}, count {byte_count}")
        needed = (byte_offset + byte_count + PAGE_SIZE - 1) >> PAGE_SHIFT
        if needed > len(pfns):
            raise GuestMemoryError(f"range needs {needed} pages, {len(pfns)} given")
        if needed and pfns[needed - 1] - pfns[0] == needed - 1 and tuple(pfns[:needed]) == tuple(
            range(pfns[0], pfns[0] + needed)
        ):
            # One physically contiguous run (the common case): one check, one view.
            self.check_pfn(pfns[0])
            self.check_pfn(pfns[needed - 1])
            return [self.view((pfns[0] << PAGE_SHIFT) + byte_offset, byte_count)]
        out: list[memoryview] = []
        remaining = byte_count
        i = 0
        offset = byte_offset
        while remaining:
            run_start = pfns[i]
            self.check_pfn(run_start)
            run = 1
            while i + run < needed and pfns[i + run] == run_start + run:
                self.check_pfn(pfns[i + run])
                run += 1
            length = min(remaining, (run << PAGE_SHIFT) - offset)
            out.append(self.view((run_start << PAGE_SHIFT) + offset, length))
            remaining -= length
            offset = 0
            i += run
        return out

    # -- atomics for the SynIC pages (word-aligned, checked) ---------------

    def _word(self, gpa: int, width: int) -> int:
        if gpa % width:
            raise GuestMemoryError(f"GPA {gpa:#x} not {width}-aligned")
        self.check_range(gpa, width)
        return gpa

    def load32(self, gpa: int) -> int:
        return self._words.load32(self._word(gpa, 4))

    def store32(self, gpa: int, value: int) -> None:
        self._words.store32(self._word(gpa, 4), value)

    def or8(self, gpa: int, value: int) -> int:
        return self._words.or8(self._word(gpa, 1), value)

    def or64(self, gpa: int, value: int) -> int:
        return self._words.or64(self._word(gpa, 8), value)

    def close(self) -> None:
        self._view.release()
        self._words.release()
        self._shm.close()
        if not self._shm.buf.closed:
            # Something still exports the mapping: a ring of a channel left
            # in a reference cycle (a task's traceback, say).  The mapping
            # keeps its own copy of the RAM fd until it is freed, so collect
            # cycles now, once, rather than at the collector's leisure: a
            # released partition returns its fd and its memory at once.
            gc.collect()
            self._shm.close()

