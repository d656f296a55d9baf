"""The guest's block device API: zero-copy buffers, LBAs, the file view,
many requests in one call, and how few exits a batch costs."""

from __future__ import annotations

import os
from pathlib import Path

from guest_kernel.drivers.storvsc import BlockRequest

from ..bus.harness import host_process
from .conftest import run_guest


def test_block_api(tmp_path: Path) -> None:
    with host_process(tmp_path, "--disk", str(tmp_path / "d.img"), "--disk-size", "16M") as host:

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
