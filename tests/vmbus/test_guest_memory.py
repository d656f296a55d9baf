"""The host's only window on guest RAM refuses everything outside it."""

from __future__ import annotations

import os

import pytest

from guest_kernel.memory import GuestRam, OutOfGuestMemory
from vmbus.guest_memory import GuestMemory, GuestMemoryError


@pytest.fixture
def pair():  # noqa: ANN201
    ram = GuestRam(1 << 20)
    mem = GuestMemory(os.dup(ram.fd), ram.size)
    yield ram, mem
    mem.close()
    ram.close()


def test_views_are_shared_and_bounded(pair) -> None:  # noqa: ANN001
    ram, mem = pair
    ram.view[8192:8197] = b"guest"
    assert bytes(mem.view(8192, 5)) == b"guest"
    for gpa, n in ((-1, 1), (1 << 20, 1), ((1 << 20) - 1, 2), (0, (1 << 20) + 1), (2**63, 2**63)):
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, n)
    with pytest.raises(GuestMemoryError):
        mem.check_pfn(256)
    assert len(mem.view((1 << 20) - 1, 1)) == 1


def test_iovec_merges_runs_and_checks_pages(pair) -> None:  # noqa: ANN001
    _, mem = pair
    iov = mem.iovec([10, 11, 12, 40, 41], 100, 4096 * 4)
    assert [len(v) for v in iov] == [4096 * 3 - 100, 4096 + 100]
    with pytest.raises(GuestMemoryError):
        mem.iovec([10, 999], 0, 8192)
    with pytest.raises(GuestMemoryError):
        mem.iovec([10], 0, 8192)  # needs two pages
    with pytest.raises(GuestMemoryError):
        mem.iovec([10], 4096, 1)  # offset must be inside the first page
    with pytest.raises(GuestMemoryError):
        mem.contiguous_pages([10, 12])


def test_allocator_contiguous_and_exhaustion() -> None:
    ram = GuestRam(64 * 4096)
    a = ram.alloc(10)
    b = ram.alloc(20)
    assert a >= 1 and b == a + 10
    ram.free(a, 10)
    assert ram.alloc(5) == a
    with pytest.raises(OutOfGuestMemory):
        ram.alloc(64)
    with pytest.raises(ValueError):
        ram.free(a + 5, 10)  # not all allocated
    ram.close()


def test_unsealed_or_short_memory_refused() -> None:
    fd = os.memfd_create("x")
    os.ftruncate(fd, 1 << 20)
    with pytest.raises(ValueError):
        GuestMemory(fd, 1 << 20)
    os.close(fd)
