"""The disk as a Python file, async and blocking, against a real host
process: its end (no write spins there), seeks, reads past the end, the
standard ``io`` protocol from a worker thread, and the bytes on the image."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
from pathlib import Path

import pytest
import trio

from guest_kernel.drivers.storvsc import BlockRawIO

from ..bus.harness import host_process
from .helpers import run_guest

MiB = 1 << 20
DISK = 4 * MiB
# Every call into the disk here answers in milliseconds; a write that spun
# at the end of the disk (sending zero-length requests forever) runs into this.
DEADLINE = 30


def _disk(tmp_path: Path, content: bytes | None = None) -> Path:
    image = tmp_path / "d.img"
    image.write_bytes(content if content is not None else random.Random(3).randbytes(DISK))
    return image


def test_async_file_end_of_disk_seek_and_reads(tmp_path: Path) -> None:
    image = _disk(tmp_path)
    before = image.read_bytes()
    with host_process(tmp_path, "--disk", str(image)) as host:

        async def body(kernel) -> None:  # noqa: ANN001
            disk = kernel.device("storage")
            cap = disk.capacity
            assert cap == DISK
            with trio.fail_after(DEADLINE):
                async with disk.open() as f:
                    assert f.readable() and f.writable() and f.seekable()
                    # across the end: refused whole, nothing written, position kept
                    f.seek(cap - 1)
                    with pytest.raises(OSError) as info:
                        await f.write(b"ab")
                    assert info.value.errno == errno.ENOSPC and f.tell() == cap - 1
                    for where in (cap, cap + 4096):  # at and past the end
                        f.seek(where)
                        with pytest.raises(OSError) as info:
                            await f.write(b"x")
                        assert info.value.errno == errno.ENOSPC
                    assert await f.write(b"") == 0
                    # the last byte is still writable, exactly
                    f.seek(cap - 1)
                    assert await f.write(b"Z") == 1 and f.tell() == cap
                    # reads at, past and across the end
                    assert await f.read() == b"" and await f.read(10) == b""
                    f.seek(cap + 12345)
                    assert await f.read(1) == b"" and f.tell() == cap + 12345
                    f.seek(-10, io.SEEK_END)
                    assert await f.read(10**15) == before[cap - 10 : cap - 1] + b"Z"
                    f.seek(cap - 3)
                    buf = bytearray(100)
                    assert await f.readinto(buf) == 3 and bytes(buf[:3]) == before[cap - 3 : cap - 1] + b"Z"
                    # negative seeks raise as FileIO does, leaving the position
                    f.seek(700)
                    for offset, whence in ((-5, io.SEEK_SET), (-701, io.SEEK_CUR), (-cap - 1, io.SEEK_END)):
                        with pytest.raises(OSError) as info:
                            f.seek(offset, whence)
                        assert info.value.errno == errno.EINVAL
                    assert f.tell() == 700
                    with pytest.raises(ValueError):
                        f.seek(0, 3)
                    # an unaligned write spanning several requests, read back
                    payload = random.Random(5).randbytes(3 * MiB + 333)
                    f.seek(1001)
                    assert await f.write(payload) == len(payload) and f.tell() == 1001 + len(payload)
                    f.seek(1001)
                    assert await f.read(len(payload)) == payload
                assert f.closed
                with pytest.raises(ValueError):
                    await f.read(1)

        run_guest(host.socket, body)
    after = bytearray(before)
    after[DISK - 1] = ord("Z")
    after[1001 : 1001 + 3 * MiB + 333] = random.Random(5).randbytes(3 * MiB + 333)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == hashlib.sha256(after).hexdigest()


def test_files_on_a_read_only_disk_refuse_writes_at_once(tmp_path: Path) -> None:
    image = _disk(tmp_path)
    before = image.read_bytes()
    with host_process(tmp_path, "--disk", str(image), "--read-only") as host:

        async def body(kernel) -> None:  # noqa: ANN001
            disk = kernel.device("storage")
            with trio.fail_after(DEADLINE):
                f = disk.open()
                assert not f.writable()
                for where in (0, disk.capacity - 1, disk.capacity):
                    f.seek(where)
                    with pytest.raises(io.UnsupportedOperation):
                        await f.write(b"ab")
                f.seek(4096)
                assert await f.read(16) == before[4096:4112]

                def blocking() -> bytes:
                    with disk.open_sync() as g:
                        assert isinstance(g, io.BufferedReader) and not g.writable()
                        with pytest.raises(io.UnsupportedOperation):
                            g.write(b"x")
                        g.seek(disk.capacity - 8)
                        return g.read()

                assert await trio.to_thread.run_sync(blocking) == before[-8:]

        run_guest(host.socket, body)
    assert image.read_bytes() == before


def test_blocking_file_from_a_worker_thread(tmp_path: Path) -> None:
    image = _disk(tmp_path)
    before = image.read_bytes()
    with host_process(tmp_path, "--disk", str(image)) as host:

        async def body(kernel) -> dict[str, object]:  # noqa: ANN001
            disk = kernel.device("storage")
            cap = disk.capacity
            syncs = []
            real_flush = disk.flush

            async def counting_flush() -> None:
                syncs.append(1)
                await real_flush()

            disk.flush = counting_flush
            raw = BlockRawIO(disk)
            with pytest.raises(RuntimeError):  # on the loop's own thread it would deadlock: refused
                raw.readinto(bytearray(1))

            def blocking() -> dict[str, object]:
                seen: dict[str, object] = {}
                with raw:
                    assert isinstance(raw, io.RawIOBase)
                    assert raw.readable() and raw.writable() and raw.seekable()
                    with pytest.raises(io.UnsupportedOperation):
                        raw.fileno()
                    with pytest.raises(io.UnsupportedOperation):
                        raw.truncate(0)
                    raw.seek(cap - 1)
                    assert raw.write(b"ab") == 1  # a short count across the end, as write(2) on a disk
                    with pytest.raises(OSError) as info:
                        raw.write(b"b")  # at the end: ENOSPC, never a zero count
                    assert info.value.errno == errno.ENOSPC
                    with pytest.raises(OSError) as info:
                        raw.seek(-5)
                    assert info.value.errno == errno.EINVAL
                    raw.seek(cap)
                    assert raw.read(10) == b"" and raw.readinto(bytearray(10)) == 0
                    raw.flush()
                    seen["syncs_after_flush"] = len(syncs)
                    raw.flush()  # nothing written since: no second SYNCHRONIZE CACHE
                    seen["syncs_after_second_flush"] = len(syncs)
                with pytest.raises(ValueError):
                    raw.read(1)

                with disk.open_sync(buffer_size=8192) as f:
                    assert isinstance(f, io.BufferedRandom)
                    f.seek(100)
                    assert f.peek(1)[:4] == before[100:104]
                    assert f.read(4) == before[100:104]
                    f.seek(10_000)
                    f.write(b"head")
                    f.write(b"-" * 70_000)  # larger than the buffer: goes straight through
                    f.seek(-4, io.SEEK_END)
                    f.write(b"tail")
                    f.seek(10_000)
                    assert f.read(4) == b"head"
                    f.seek(0)
                    assert f.read(3) == before[:3]
                seen["syncs_after_close"] = len(syncs)

                f = disk.open_sync()
                f.seek(cap - 2)
                f.write(b"xyz")  # crosses the end: what fits is written, the rest is ENOSPC
                with pytest.raises(OSError) as info:
                    f.close()
                assert info.value.errno == errno.ENOSPC and f.closed
                seen["syncs_after_failed_close"] = len(syncs)

                with disk.open_sync() as f:  # only reads: closing sends nothing
                    f.read(4096)
                seen["syncs_after_read_only_use"] = len(syncs)
                return seen

            with trio.fail_after(DEADLINE):
                return await trio.to_thread.run_sync(blocking)

        seen = run_guest(host.socket, body)
    assert seen == {"syncs_after_flush": 1, "syncs_after_second_flush": 1, "syncs_after_close": 2,
                    "syncs_after_failed_close": 3, "syncs_after_read_only_use": 3}
    after = bytearray(before)
    after[10_000 : 10_000 + 70_004] = b"head" + b"-" * 70_000
    after[DISK - 4 : DISK] = b"taxy"  # "tail", then the raw "a" and the buffered "xy" that fitted
    assert image.read_bytes() == bytes(after)
    assert os.path.getsize(image) == DISK
