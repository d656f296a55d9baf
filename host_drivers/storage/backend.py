"""The disk behind the device: a raw image file or a block device.

All calls block (they are system calls on a file) and are made from a
worker thread, never from the event loop.  Data moves with ``preadv`` /
``pwritev`` straight between the file and the guest-memory views the
caller passes: no copy on the host.  FUA writes use ``RWF_DSYNC`` (durable
before they return); ``flush`` is ``fdatasync``; ``discard`` punches a
hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)``), so discarded blocks read
back as zeros and give their space back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class DiskImage:
    def __init__(self, path: str, *, size: int | None = None, read_only: bool = False, block_size: int = 512) -> None:
        self.path = path
        self.read_only = read_only
        self.block_size = block_size
        if not os.path.lexists(path):
            if size is None or read_only:
                raise FileNotFoundError(errno.ENOENT, "no such disk image (give a size to create one)", path)
            self._create(path, size)
        # An existing image or device is served as it is: never truncated or
        # resized, whatever ``size`` says.
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        self.size -= self.size % block_size
        self.blocks = self.size // block_size

    @staticmethod
    def _create(path: str, size: int) -> None:
        """A new sparse image (no blocks until written).  ``O_EXCL``: a file
        that appeared since the check is never truncated; one made here that
        cannot take the size is removed again."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    def readv(self, iov: Sequence[memoryview], offset: int) -> int:
        """Fill ``iov`` from ``offset``; returns the bytes read (short only at EOF)."""
        done = 0
        bufs = list(iov)
        while bufs:
            n = os.preadv(self.fd, bufs, offset + done)
            if n == 0:
                break
            done += n
            bufs = _advance(bufs, n)
        return done

    def writev(self, iov: Sequence[memoryview], offset: int, *, fua: bool = False) -> int:
        done = 0
        bufs = list(iov)
        flags = os.RWF_DSYNC if fua else 0
        while bufs:
            n = os.pwritev(self.fd, bufs, offset + done, flags)
            done += n
            bufs = _advance(bufs, n)
        return done

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            if err != errno.EOPNOTSUPP:  # a discard is a hint: a file system without holes may ignore it
                raise OSError(err, os.strerror(err), self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    while n and bufs:
        if n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        else:
            bufs[0] = bufs[0][n:]
            n = 0
    return bufs
