"""Each paravirtual disk as a file real programs open: ``/dev/pvbus/diskN``.

A FUSE file system (pyfuse3, which runs in the guest kernel's own trio
loop) with one regular file per storvsc disk, as long as the disk, served
straight onto the driver's block API:

- reads and writes of any size and alignment: the covering run of whole
  blocks goes to the disk in one request per ``max_transfer`` (guest pages
  named by page list, ``read_into`` / ``write_from``); a write that starts
  or ends inside a block first reads that block and merges (read-modify-
  write).  Writes hold their block range while they run, so a merge never
  puts back bytes another write has just written;
- ``fsync`` / ``fdatasync`` -> SCSI SYNCHRONIZE CACHE (``disk.flush()``),
  which the host answers after ``fdatasync`` on its image: an ``fsync`` in
  a program returns once the data is on the host's storage.  A loop
  device's flush (what ext4's journal commit sends) is an ``fsync`` of its
  backing file, so it takes the same path;
- files are opened ``direct_io``: no guest page cache above the disk, every
  read and write reaches it (a program's ``O_DIRECT`` works too);
- FUSE's limit on requests in flight (``max_background``, 12 by default,
  which caps a program's asynchronous queue depth) is raised to
  ``MAX_BACKGROUND`` through the FUSE control file system, mounted in the
  guest's namespace where it is not mounted already;
- the disks' queues do not poll (interrupts only) while presented: the
  same thread reads FUSE requests, and a poll would keep it from them;
- a disk's size is fixed: a write past the end gets ENOSPC, a truncate is
  ignored (as Linux ignores ``O_TRUNC`` on a block device); a read-only
  disk's file is mode 0400 and refuses writes with EROFS;
- ``fallocate(PUNCH_HOLE)`` is not offered: pyfuse3 (3.5) has no fallocate
  operation, so the kernel answers EOPNOTSUPP and a loop device over the
  file turns discard off.  ``disk.discard`` stays on the Python API.

Errors from the disk become the errno a block device gives (EROFS,
ENOSPC, EIO); a disk the host took away gives EIO.  ``presented`` mounts
the file system, serves it in a task that outlives a cancelled caller
until the end of its block (a program may still be unmounting through
it), then waits for every open file to be released, flushes the disks
that were written and unmounts.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger(__name__)

MOUNTPOINT = "/dev/pvbus"
FUSE_CONNECTIONS = "/sys/fs/fuse/connections"
# Requests FUSE lets the file system have in flight at once for asynchronous
# (libaio) direct I/O: the kernel's default of 12 caps a program's queue
# depth; a disk takes 256 per queue.
MAX_BACKGROUND = 128
RELEASE_WAIT = 10.0  # seconds for programs' files (and loop devices) to let go at the end
FLUSH_WAIT = 30.0  # seconds for the final SYNCHRONIZE CACHE of each disk

try:
    import pyfuse3
except ImportError:  # the `programs` extra is optional: say what is missing when it is needed
    pyfuse3 = None  # type: ignore[assignment]


class PresenterError(OSError):
    """Why the disks cannot be shown to programs here: one line."""


def fuse_available() -> str | None:
    """Why FUSE cannot be used here, or None."""
    if pyfuse3 is None:
        return "pyfuse3 is not installed (pip install 'pvbus[programs]'; it builds against libfuse3-dev)"
    if not os.path.exists("/dev/fuse"):
        return "there is no /dev/fuse (load the fuse module, or give the guest the FUSE device)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not open to us (FUSE needs root or access to /dev/fuse)"
    return None


class _WriteRanges:
    """Byte ranges being written: a write waits while it overlaps another."""

    def __init__(self) -> None:
        self._busy: list[tuple[int, int]] = []
        self._released = trio.Event()

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while any(s < end and start < e for s, e in self._busy):
            await self._released.wait()
        self._busy.append((start, end))
        try:
            yield
        finally:
            self._busy.remove((start, end))
            released, self._released = self._released, trio.Event()
            released.set()


@dataclass
class _Disk:
    name: str
    inode: int
    driver: Any  # a StorvscDriver
    ranges: _WriteRanges = field(default_factory=_WriteRanges)
    written: bool = False  # since the last SYNCHRONIZE CACHE
    flushes: int = 0


def _errno(exc: BaseException) -> int:
    """The errno a block device gives for what the disk said."""
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOSPC, errno.EIO):
        return exc.errno
    if isinstance(exc, ValueError):
        return errno.EINVAL
    return errno.EIO


class DiskFiles(pyfuse3.Operations if pyfuse3 is not None else object):  # type: ignore[misc]
    """The FUSE operations: a root directory and one file per disk."""

    def __init__(self, disks: dict[str, Any]) -> None:
        super().__init__()
        self.disks = [_Disk(name, pyfuse3.ROOT_INODE + 1 + i, driver) for i, (name, driver) in enumerate(disks.items())]
        self._by_inode = {d.inode: d for d in self.disks}
        self._handles: dict[int, _Disk] = {}
        self._next_handle = 1
        self._all_released = trio.Event()
        self._all_released.set()
        self._born_ns = time.time_ns()

    # -- names and attributes ----------------------------------------------------

    def _attributes(self, inode: int) -> Any:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._born_ns
        attr.entry_timeout = attr.attr_timeout = 3600  # nothing here ever changes
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
            return attr
        disk = self._by_inode.get(inode)
        if disk is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_mode = stat.S_IFREG | (0o400 if disk.driver.read_only else 0o600)
        attr.st_nlink = 1
        attr.st_size = disk.driver.capacity
        attr.st_blksize = max(disk.driver.block_size, 4096)
        attr.st_blocks = disk.driver.capacity // 512
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attributes(pyfuse3.ROOT_INODE)
        for disk in self.disks:
            if os.fsencode(disk.name) == name:
                return self._attributes(disk.inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attributes(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        # A disk's size, owner and mode are fixed: a truncate (O_TRUNC) is
        # ignored as Linux ignores it on a block device; chmod/chown refused.
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attributes(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return 0

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for index, disk in enumerate(self.disks[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(disk.name), self._attributes(disk.inode), index + 1):
                return

    async def statfs(self, ctx: Any) -> Any:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = sum(d.driver.capacity for d in self.disks) // 4096
        out.f_files, out.f_namemax = len(self.disks) + 1, 255
        return out

    # -- open files ----------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        disk = self._by_inode.get(inode)
        if disk is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY and disk.driver.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        self._handles[handle] = disk
        self._all_released = trio.Event()
        return pyfuse3.FileInfo(fh=handle, direct_io=True, keep_cache=False)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
        if not self._handles:
            self._all_released.set()

    async def flush(self, fh: int) -> None:
        return None  # a close: durability is fsync's job, as on a block device

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            await self.sync(self._disk(fh))
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # noqa: BLE001 - the disk's failure, as a program's errno
            log.debug("fsync of %s failed: %s", self._disk(fh).name, exc)
            raise pyfuse3.FUSEError(_errno(exc)) from None

    async def sync(self, disk: _Disk) -> None:
        """SYNCHRONIZE CACHE; returns after the host flushed its image."""
        disk.written = False
        await disk.driver.flush()
        disk.flushes += 1

    def _disk(self, fh: int) -> _Disk:
        disk = self._handles.get(fh)
        if disk is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return disk

    @property
    def open_files(self) -> int:
        return len(self._handles)

    async def wait_released(self) -> None:
        """Return once no program (or loop device) holds a disk's file open."""
        while self._handles:
            await self._all_released.wait()

    # -- data ----------------------------------------------------------------------

    async def read(self, fh: int, off: int, size: int) -> bytes:
        disk = self._disk(fh)
        driver = disk.driver
        end = min(off + size, driver.capacity)
        if off >= end:
            return b""
        try:
            return await self._read(driver, off, end)
        except Exception as exc:  # noqa: BLE001 - the disk's failure, as a program's errno
            log.debug("read of %s at %d failed: %s", disk.name, off, exc)
            raise pyfuse3.FUSEError(_errno(exc)) from None

    @staticmethod
    async def _read(driver: Any, off: int, end: int) -> bytes:
        bs = driver.block_size
        start, stop = off - off % bs, -(-end // bs) * bs
        step = driver.max_transfer // bs * bs
        if stop - start <= step:  # the usual case: one request, one copy out of guest RAM
            with driver.buffer(stop - start) as buf:
                await driver.read_into([start], [buf])
                return bytes(buf.view[off - start : end - start])
        out = bytearray(end - off)
        for at in range(start, stop, step):
            with driver.buffer(min(step, stop - at)) as buf:
                await driver.read_into([at], [buf])
                lo, hi = max(at, off), min(at + len(buf.view), end)
                out[lo - off : hi - off] = buf.view[lo - at : hi - at]
        return bytes(out)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        disk = self._disk(fh)
        driver = disk.driver
        if driver.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off >= driver.capacity and buf:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        data = memoryview(buf)[: driver.capacity - off]  # a write crossing the end: what fits
        step = max(driver.block_size, driver.max_transfer - driver.block_size)  # room for unaligned edges
        try:
            for done in range(0, len(data), step):
                await self._write(disk, off + done, data[done : done + step])
        except Exception as exc:  # noqa: BLE001 - the disk's failure, as a program's errno
            log.debug("write of %s at %d failed: %s", disk.name, off, exc)
            raise pyfuse3.FUSEError(_errno(exc)) from None
        return len(data)

    @staticmethod
    async def _write(disk: _Disk, pos: int, piece: memoryview) -> None:
        driver = disk.driver
        bs = driver.block_size
        start, stop = pos - pos % bs, -(-(pos + len(piece)) // bs) * bs
        head, tail = pos - start, stop - (pos + len(piece))
        async with disk.ranges.hold(start, stop):
            with driver.buffer(stop - start) as buf:
                if head:  # keep what the first block holds before the data ...
                    buf.view[:bs] = await driver.read(start, bs)
                if tail and not (head and stop - start == bs):  # ... and the last block after it
                    buf.view[-bs:] = await driver.read(stop - bs, bs)
                buf.view[head : head + len(piece)] = piece
                disk.written = True
                await driver.write_from([start], [buf])


@asynccontextmanager
async def presented(disks: dict[str, Any], mountpoint: str = MOUNTPOINT) -> AsyncIterator[DiskFiles]:
    """Mount the disks' files at ``mountpoint`` and serve them for the
    duration of the block; then wait (``RELEASE_WAIT``) for every file to
    be released, flush the disks written since their last flush, unmount.
    Raises ``PresenterError`` (one line) where FUSE is not available."""
    if (missing := fuse_available()) is not None:
        raise PresenterError(errno.ENODEV, f"cannot show the disks to programs: {missing}")
    # /dev/pvbus is made if missing: an empty directory on the host's /dev
    # (devtmpfs), the one thing outside the guest's namespace it leaves.
    os.makedirs(mountpoint, exist_ok=True)
    # The disks' queues sleep on their interrupt instead of polling: a poll
    # spins on this thread, which must meanwhile read the next FUSE requests
    # (measured: polling ran rand 4 KiB QD32 through FUSE at about QD1's rate).
    for driver in disks.values():
        for queue in driver.queues:
            queue.poller.poll_us = 0
    ops = DiskFiles(disks)
    try:
        pyfuse3.init(ops, mountpoint, {"fsname=pvbus", "subtype=pvbus", "default_permissions"})
    except RuntimeError as exc:
        raise PresenterError(errno.EIO, f"cannot mount the disks' files on {mountpoint}: {exc}") from None
    _deepen_queue(mountpoint)
    try:
        async with trio.open_nursery() as nursery:
            # Shielded: programs may still be unmounting through these files
            # while the guest is being cancelled (its host gone); the
            # serving ends when this block says so, not before.
            serving = trio.CancelScope(shield=True)
            nursery.start_soon(_serve, serving)
            try:
                yield ops
            finally:
                with trio.CancelScope(shield=True):
                    await _finish(ops)
                    serving.cancel()
    finally:
        pyfuse3.close(unmount=True)


def _deepen_queue(mountpoint: str) -> None:
    """Raise the FUSE connection's ``max_background`` (and its congestion
    threshold, three quarters of it); on any refusal, say so at debug level
    and keep the kernel's default."""
    from ..namespaces import NamespaceError, mount_fs, mount_table

    table = mount_table()
    ours = [m for m in table if m.target == mountpoint and m.fstype.startswith("fuse")]
    if not ours or ours[-1].device[0] != 0:
        return
    try:
        if not any(m.target == FUSE_CONNECTIONS for m in table):
            mount_fs("fusectl", FUSE_CONNECTIONS)  # in the guest's mount namespace only
        connection = os.path.join(FUSE_CONNECTIONS, str(ours[-1].device[1]))
        for name, value in (("max_background", MAX_BACKGROUND), ("congestion_threshold", MAX_BACKGROUND * 3 // 4)):
            with open(os.path.join(connection, name), "w") as f:
                f.write(str(value))
    except (OSError, NamespaceError) as exc:
        log.debug("FUSE keeps its default queue depth: %s", exc)


async def _serve(scope: trio.CancelScope) -> None:
    with scope:
        await pyfuse3.main()


async def _finish(ops: DiskFiles) -> None:
    with trio.move_on_after(RELEASE_WAIT):
        await ops.wait_released()
    if ops.open_files:
        log.warning("%d file(s) of the disks still open after %.0f s; unmounting anyway",
                    ops.open_files, RELEASE_WAIT)
    for disk in ops.disks:
        if not disk.written:
            continue
        with trio.move_on_after(FLUSH_WAIT) as waited:
            try:
                await ops.sync(disk)
            except Exception as exc:  # noqa: BLE001 - logged: the caller reports the guest's end
                log.info("final flush of %s failed: %s", disk.name, exc)
        if waited.cancelled_caught:
            log.warning("final flush of %s took over %.0f s; given up", disk.name, FLUSH_WAIT)
