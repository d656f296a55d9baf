"""The paravirtual disk as a Python file: an async one and a standard one.

``BlockFile`` (``disk.open()``) is the async view for guest programs on the
trio loop: ``await f.read(n)``, ``readinto``, ``write``, ``flush``,
``aclose`` / ``async with``; ``seek`` and ``tell`` are plain calls (they
move a position and do no I/O).  Any length and alignment works: partial
blocks at either end of a write are read, merged and written back.

``BlockRawIO`` is an ``io.RawIOBase`` over the same logic, for code that
wants a real blocking file (file-system libraries, ``shutil``, ``struct``
readers).  It must run in a worker thread (``trio.to_thread.run_sync``):
each call hands its I/O to the trio loop with ``trio.from_thread.run`` and
waits.  ``disk.open_sync()`` wraps it in ``io.BufferedRandom`` (or
``io.BufferedReader`` on a read-only disk), which brings ``peek``,
``readline`` and buffering.

The file is as long as the disk and behaves as a Linux block device does:

- a read at or past the end returns ``b""``; one that crosses it is cut at
  the end;
- ``seek`` may go past the end but never below 0 (``OSError(EINVAL)``, as
  ``FileIO`` raises); ``whence`` is 0, 1 or 2;
- the raw file's ``write`` that crosses the end writes what fits and
  returns that short count; one that starts at or past the end raises
  ``OSError(ENOSPC)`` (so a buffered writer never retries a zero count);
  the async file's ``write`` is all or nothing: a write that would cross the
  end raises ``OSError(ENOSPC)`` and writes nothing;
- on a read-only disk ``writable()`` is False and ``write`` raises
  ``io.UnsupportedOperation``, as a file opened for reading does;
- ``flush`` sends SYNCHRONIZE CACHE when this file wrote since the last one
  (closing flushes); a buffered file's ``flush()`` only empties its buffer,
  as with any Python file: ``f.flush(); f.raw.flush()`` is the ``fsync``;
- ``fileno`` and ``truncate`` raise ``io.UnsupportedOperation``: there is no
  descriptor, and a disk's size is fixed.
"""

from __future__ import annotations

import errno
import io
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .storvsc import StorvscDriver

Buffer = bytes | bytearray | memoryview


def _closed() -> ValueError:
    return ValueError("I/O operation on closed file")


class BlockFile:
    """The async file view of a disk (``disk.open()``)."""

    def __init__(self, disk: StorvscDriver) -> None:
        self.disk = disk
        self.pos = 0
        self.closed = False
        self._dirty = False  # written since the last SYNCHRONIZE CACHE

    @property
    def dirty(self) -> bool:
        """Written since the last SYNCHRONIZE CACHE."""
        return self._dirty

    # -- position --------------------------------------------------------------

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        offset = offset.__index__()
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self.pos + offset
        elif whence == io.SEEK_END:
            target = self.disk.capacity + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if target < 0:
            raise OSError(errno.EINVAL, f"negative seek position {target}")
        self.pos = target
        return target

    def tell(self) -> int:
        self._check_open()
        return self.pos

    def readable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return not self.disk.read_only

    def seekable(self) -> bool:
        self._check_open()
        return True

    # -- data --------------------------------------------------------------------

    def _chunk(self) -> int:
        """Bytes per request: the largest transfer less one block (an
        unaligned span covers one block more than its length)."""
        bs = self.disk.block_size
        return max(bs, self.disk.max_transfer - bs)

    async def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the position; the count read (0 at the end)."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        bs, capacity = self.disk.block_size, self.disk.capacity
        n = max(0, min(len(view), capacity - self.pos))
        done = 0
        while done < n:
            start = self.pos - self.pos % bs
            take = min(n - done, self._chunk() - (self.pos - start))
            end = min(capacity, -(-(self.pos + take) // bs) * bs)
            data = await self.disk.read(start, end - start)
            view[done : done + take] = data[self.pos - start : self.pos - start + take]
            done += take
            self.pos += take
        return done

    async def read(self, n: int | None = -1) -> bytes:
        """Up to ``n`` bytes from the position (all to the end if ``n`` is
        negative or None); ``b""`` at or past the end."""
        self._check_open()
        room = max(0, self.disk.capacity - self.pos)
        want = room if n is None or n < 0 else min(n.__index__(), room)
        buffer = bytearray(want)
        got = await self.readinto(buffer)
        return bytes(buffer[:got])

    async def write(self, data: Buffer) -> int:
        """Write all of ``data`` at the position, or raise: a write that would
        cross the end of the disk raises ``OSError(ENOSPC)`` and writes nothing."""
        view = self._writable_view(data)
        if view and len(view) > self.disk.capacity - self.pos:
            raise self._no_space(len(view))
        return await self._write(view)

    async def write_some(self, data: Buffer) -> int:
        """A raw file's write: what fits before the end (a short count when
        ``data`` crosses it); ``OSError(ENOSPC)`` at or past the end."""
        view = self._writable_view(data)
        if not view:
            return 0
        room = self.disk.capacity - self.pos
        if room <= 0:
            raise self._no_space(len(view))
        return await self._write(view[:room])

    async def _write(self, view: memoryview) -> int:
        """Write ``view`` (which fits on the disk) at the position."""
        bs = self.disk.block_size
        done = 0
        while done < len(view):
            start = self.pos - self.pos % bs
            take = min(len(view) - done, self._chunk() - (self.pos - start))
            end = -(-(self.pos + take) // bs) * bs
            blocks = bytearray(end - start)
            head, tail = self.pos % bs, (self.pos + take) % bs
            if head:  # keep the bytes before the position in its first block
                blocks[:bs] = await self.disk.read(start, bs)
            if tail and not (head and end - bs == start):  # ... and after the data in its last block
                blocks[-bs:] = await self.disk.read(end - bs, bs)
            blocks[head : head + take] = view[done : done + take]
            self._dirty = True
            await self.disk.write(start, blocks)
            done += take
            self.pos += take
        return done

    def _writable_view(self, data: Buffer) -> memoryview:
        self._check_open()
        if self.disk.read_only:
            raise io.UnsupportedOperation("write: the disk is read-only")
        return memoryview(data).cast("B")

    def _no_space(self, length: int) -> OSError:
        return OSError(errno.ENOSPC, f"no space left on the disk: {length} bytes at offset {self.pos} "
                                     f"go past its end ({self.disk.capacity} bytes)")

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE if this file wrote since the last one."""
        self._check_open()
        if self._dirty:
            self._dirty = False
            await self.disk.flush()

    async def aclose(self) -> None:
        if not self.closed:
            try:
                await self.flush()
            finally:
                self.closed = True

    async def __aenter__(self) -> BlockFile:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self.closed:
            raise _closed()


class BlockRawIO(io.RawIOBase):
    """A blocking ``io.RawIOBase`` over a ``BlockFile``, for worker threads.

    Make it on the trio thread or in a thread trio started; every I/O call
    must come from a thread other than the trio loop's (it blocks until the
    loop has done the request)."""

    def __init__(self, disk: StorvscDriver) -> None:
        super().__init__()
        self._file = BlockFile(disk)
        try:  # a thread that trio did not start finds the loop by its token
            self._token: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:
            self._token = None
        self.name = f"<disk of {disk.capacity} bytes>"
        self.mode = "rb" if disk.read_only else "rb+"

    def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self.closed:
            raise _closed()
        if self._token is None:
            return trio.from_thread.run(fn, *args)
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def readable(self) -> bool:
        return self._file.readable()

    def writable(self) -> bool:
        return self._file.writable()

    def seekable(self) -> bool:
        return self._file.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: Any) -> int:
        return int(self._call(self._file.readinto, buffer))

    def readall(self) -> bytes:
        return bytes(self._call(self._file.read, -1))

    def write(self, data: Any) -> int:
        return int(self._call(self._file.write_some, data))

    def flush(self) -> None:
        if self.closed:
            raise _closed()
        if self._file.dirty:  # nothing to make durable otherwise: no call into the loop
            self._call(self._file.flush)

    def close(self) -> None:
        try:
            super().close()  # flushes once, then marks the file closed
        finally:
            self._file.closed = True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno: the disk is not a file descriptor")

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("truncate: a disk's size is fixed")


def open_sync(disk: StorvscDriver, buffer_size: int = io.DEFAULT_BUFFER_SIZE) -> io.BufferedRandom | io.BufferedReader:
    """A buffered blocking file on the disk (``BufferedReader`` if it is
    read-only): use it from a worker thread, close it when done."""
    raw = BlockRawIO(disk)
    if raw.writable():
        return io.BufferedRandom(raw, buffer_size)
    return io.BufferedReader(raw, buffer_size)
