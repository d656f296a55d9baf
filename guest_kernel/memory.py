"""Guest RAM: a sealed memfd the guest owns, and its 4 KiB page allocator.

GPA = offset into the memfd; PFN = GPA >> 12.  The fd goes to the host
once, at partition creation.  The allocator hands out runs of physically
consecutive pages (rings must be contiguous: the host maps a ring GPADL
as one range) with first fit over a bytearray of page states; page 0 is
never handed out, so GPA 0 can mean "none".
"""

from __future__ import annotations

from ring import PAGE_SIZE, SharedMemory, SharedWords

PAGE_SHIFT = 12  # PAGE_SIZE is the ring's, the one page size
DEFAULT_RAM = 256 << 20


class OutOfGuestMemory(MemoryError):
    pass


class GuestRam:
    def __init__(self, size: int = DEFAULT_RAM) -> None:
        self.shm = SharedMemory.create(size, "pvbus-guest-ram")
        self.size = size
        self.pages = size >> PAGE_SHIFT
        self.view = memoryview(self.shm.buf)
        self._words = SharedWords(self.shm.buf)
        self._used = bytearray(self.pages)
        self._used[0] = 1
        self._hint = 1

    @property
    def fd(self) -> int:
        return self.shm.fd

    def alloc(self, npages: int, *, zero: bool = True) -> int:
        """``npages`` consecutive pages (zeroed unless ``zero=False``, for I/O
        buffers the device or the caller fills anyway); returns the first PFN."""
        if npages <= 0:
            raise ValueError("allocate at least one page")
        run = bytes(npages)
        for start_from in (self._hint, 1):
            at = self._used.find(run, start_from)
            if at != -1:
                self._used[at : at + npages] = b"\x01" * npages
                self._hint = at + npages
                if zero:
                    self.view[at << PAGE_SHIFT : (at + npages) << PAGE_SHIFT] = bytes(npages << PAGE_SHIFT)
                return at
        raise OutOfGuestMemory(f"no run of {npages} free pages")

    def free(self, pfn: int, npages: int) -> None:
        if pfn <= 0 or pfn + npages > self.pages or 0 in self._used[pfn : pfn + npages]:
            raise ValueError(f"freeing pages {pfn}+{npages} that are not allocated")
        self._used[pfn : pfn + npages] = bytes(npages)
        self._hint = min(self._hint, pfn)

    @property
    def free_pages(self) -> int:
        return self._used.count(0)

    def pages_view(self, pfn: int, npages: int) -> memoryview:
        return self.view[pfn << PAGE_SHIFT : (pfn + npages) << PAGE_SHIFT]

    # atomics on the SynIC pages (the guest's side of the handshakes)
    def load32(self, gpa: int) -> int:
        return self._words.load32(gpa)

    def store32(self, gpa: int, value: int) -> None:
        self._words.store32(gpa, value)

    def xchg64(self, gpa: int, value: int) -> int:
        return self._words.xchg64(gpa, value)

    def close(self) -> None:
        self.view.release()
        self._words.release()
        self.shm.close()


class DmaBuffer:
    """Physically contiguous I/O memory in guest RAM, for devices that read
    and write it in place (a storvsc page list, an emulated DMA engine):
    the zero-copy path, as O_DIRECT into a guest's own pages."""

    def __init__(self, ram: GuestRam, nbytes: int) -> None:
        self.ram = ram
        self.npages = max(1, (nbytes + PAGE_SIZE - 1) // PAGE_SIZE)
        self.pfn = ram.alloc(self.npages, zero=False)
        self.view = ram.pages_view(self.pfn, self.npages)[:nbytes]

    def free(self) -> None:
        if self.npages:
            self.view.release()
            self.ram.free(self.pfn, self.npages)
            self.npages = 0

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()
