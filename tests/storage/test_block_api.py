"""The guest's block device API: zero-copy buffers, LBAs, the file view,
many requests in one call, and how few exits a batch costs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from guest_kernel.drivers.storvsc import BlockError, BlockRequest
from vmbus.protocols import storvsc as S

from ..bus.harness import host_process
from .helpers import run_guest


def test_block_api(tmp_path: Path) -> None:
    # Only the disk: the integration services answer the host on their own
    # schedule, and each answer is a signal of its own (counted below).
    with host_process(tmp_path, "--device", "storage", "--disk", str(tmp_path / "d.img"), "--disk-size", "16M") as host:

        async def body(kernel) -> None:  # noqa: ANN001
            disk = kernel.device("storage")
            # zero-copy: the host writes and reads the buffer's guest pages in place
            with disk.buffer(64 * 1024) as buf:
                payload = os.urandom(64 * 1024)
                buf.view[:] = payload
                (res,) = await disk.submit([BlockRequest("write", 1 << 20, buffer=buf)])
                assert res.error is None
                buf.view[:] = bytes(len(buf.view))
                (res,) = await disk.submit([BlockRequest("read", 1 << 20, 64 * 1024, buffer=buf)])
                assert res.error is None and res.data is None and bytes(buf.view) == payload
            assert await disk.read(1 << 20, 64 * 1024) == payload
            # LBAs
            await disk.write_blocks(10, b"L" * 1024)
            assert await disk.read_blocks(10, 2) == b"L" * 1024
            # the file view: unaligned reads and writes, seek and tell
            f = disk.open()
            f.seek(5000 + 3)
            assert await f.write(b"hello, unaligned world") == 22
            f.seek(-22, 1)
            assert await f.read(22) == b"hello, unaligned world"
            assert f.tell() == 5003 + 22
            f.seek(0, 2)
            assert f.tell() == disk.capacity and await f.read(10) == b""
            # 32 writes in one call: one ring commit, at most one HvSignalEvent
            before = kernel.hypercalls.exits["signal_event"]
            reqs = [BlockRequest("write", (2 << 20) + i * 4096, data=bytes([i]) * 4096) for i in range(32)]
            assert all(r.error is None for r in await disk.submit(reqs))
            assert kernel.hypercalls.exits["signal_event"] - before <= 1
            got = await disk.submit([BlockRequest("read", (2 << 20) + i * 4096, 4096) for i in range(32)])
            assert [r.data for r in got] == [bytes([i]) * 4096 for i in range(32)]
            assert kernel.ram.free_pages > 0

        run_guest(host.socket, body)
    with open(tmp_path / "d.img", "rb") as f:  # what the guest wrote is in the image
        f.seek(5003)
        assert f.read(22) == b"hello, unaligned world"


def test_vectored_reads_and_writes(tmp_path: Path) -> None:
    """``write_from``/``read_into``: many whole guest buffers per call, spread
    over the queues, data checked byte for byte, one failure named by index
    while every other request still completes."""
    sizes = [4096, 512, 65536, 1 << 20, 8192] * 10  # 50 requests: more than one queue takes
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += size + 4096  # gaps: a misplaced request would show
    with host_process(tmp_path, "--device", "storage", "--disk", str(tmp_path / "d.img"), "--disk-size", "16M") as host:

        async def body(kernel) -> list[str]:  # noqa: ANN001
            disk = kernel.device("storage")
            assert len(disk.queues) > 1
            sources = [disk.buffer(size) for size in sizes]
            for buf in sources:
                buf.view[:] = os.urandom(len(buf.view))
            before = kernel.hypercalls.exits["signal_event"]
            await disk.write_from(offsets, sources, fua=True)
            assert kernel.hypercalls.exits["signal_event"] - before <= len(disk.queues)
            targets = [disk.buffer(size) for size in sizes]
            await disk.read_into(offsets, targets)
            for src, dst in zip(sources, targets, strict=True):
                assert bytes(dst.view) == bytes(src.view)
            # the gaps stayed empty
            assert await disk.read(offsets[0] + sizes[0], 4096) == bytes(4096)
            # request 3 lies past the end; the rest still complete
            bad = list(offsets[:6])
            bad[3] = disk.capacity - 512
            fresh = [disk.buffer(size) for size in sizes[:6]]
            with pytest.raises(BlockError) as info:
                await disk.read_into(bad, fresh)
            assert info.value.index == 3 and info.value.sense == S.LBA_OUT_OF_RANGE
            assert all(bytes(fresh[i].view) == bytes(sources[i].view) for i in (0, 1, 2, 4, 5))
            with pytest.raises(ValueError):
                await disk.read_into(offsets[:2], targets[:3])  # one offset per buffer
            with pytest.raises(ValueError):
                await disk.read_into([100], targets[:1])  # not block aligned
            written = [hashlib.sha256(src.view).hexdigest() for src in sources]
            for buf in sources + targets + fresh:
                buf.free()
            return written

        written = run_guest(host.socket, body)
    image = (tmp_path / "d.img").read_bytes()  # FUA writes: in the image as the host left it
    assert [hashlib.sha256(image[o : o + n]).hexdigest() for o, n in zip(offsets, sizes, strict=True)] == written
