"""Shared memory for rings: a memfd, mapped, its fd passed to the peer.

``SharedMemory.create(size)`` makes an anonymous memfd, sizes it, seals it
against growing and shrinking (the peer then cannot SIGBUS us by
truncating it) and maps it.  ``SharedMemory.attach(fd)`` maps one received
from the peer and checks its size against what was promised.  The fd
travels over an AF_UNIX socket with ``send_fds``/``recv_fds`` (SCM_RIGHTS).
No ``multiprocessing.shared_memory``: on 3.11 its resource tracker unlinks
segments when an attaching process exits (python/cpython#82300).
"""

from __future__ import annotations

import fcntl
import mmap
import os


class SharedMemory:
    """A mapped memfd.  ``buf`` is the mapping; ``fd`` stays open for passing."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls, size: int, name: str = "pvbus") -> SharedMemory:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"shared memory size {size} is not a positive multiple of the page size")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int | None = None) -> SharedMemory:
        """Map an fd from the peer; refuse one smaller than ``size`` or unsealed."""
        actual = os.fstat(fd).st_size
        if size is not None and actual < size:
            raise ValueError(f"shared memory is {actual} bytes, {size} were promised")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ValueError("shared memory can be shrunk by its owner; refusing to map it")
        return cls(fd, size if size is not None else actual)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            # A ring still exports the mapping; it goes when they do.
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
