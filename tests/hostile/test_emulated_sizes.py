"""Register accesses of sizes a register does not have, against a real host.

The IDE data port takes 16-bit accesses and the task-file ports 8-bit ones:
any other size is answered INVALID_PARAMETER without touching the
controller, and the host logs one line for it, never a traceback.  The DMA
controller's registers take aligned 8-byte accesses; other sizes read as a
floating bus and writes of them are ignored.  Afterwards both controllers
still move the right bytes and the image is unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guest_kernel.drivers.dmadisk import BASE as DMA_BASE
from guest_kernel.drivers.dmadisk import CMD, COUNT, LBA, STATUS
from guest_kernel.drivers.ide import BASE, COMMAND, DATA, DRQ, FEATURES, READ_SECTORS
from vmbus import hv
from vmbus.errors import HypercallFailed

from ..storage.helpers import run_guest
from .processes import logged_host

MiB = 1 << 20


def test_register_accesses_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    content = os.urandom(2 * MiB)
    image.write_bytes(content)
    with logged_host(tmp_path, "--disk", str(image), "--emulated-disks") as host:

        async def body(kernel) -> None:  # noqa: ANN001
            hc = kernel.hypercalls
            ide = await kernel.emulated_disk("ide")
            await ide.read(0, 512)  # a command that completed: no transfer in progress
            refused = [(DATA, 4, True, 0xFFFFFFFF), (DATA, 8, True, 1 << 63), (DATA, 1, True, 0xFF),
                       (DATA, 4, False, 0), (DATA, 8, False, 0), (COMMAND, 2, True, READ_SECTORS),
                       (COMMAND, 4, False, 0), (FEATURES, 8, True, 1)]
            for port, size, write, value in refused:
                with pytest.raises(HypercallFailed) as failed:
                    await hc.io(BASE + port, size, write=write, value=value)
                assert failed.value.status == hv.HvStatus.INVALID_PARAMETER, (port, size, write)
            # A READ SECTORS written with a 2-byte access did not run: no data is waiting.
            assert not await hc.io(BASE + COMMAND, 1) & DRQ
            # DMA: every other size reads as floating bus, writes of it are ignored.
            for reg in (CMD, LBA, COUNT, STATUS):
                for size in (1, 2, 4):
                    await hc.io(DMA_BASE + reg, size, write=True, value=(1 << (8 * size)) - 1)
                    assert await hc.io(DMA_BASE + reg, size) == (1 << (8 * size)) - 1
            assert await hc.io(DMA_BASE + COUNT, 8) == 0  # the odd-sized writes left it alone
            # both controllers still move the right bytes
            assert await ide.read(4096, 1024) == content[4096:5120]
            dma = await kernel.emulated_disk("dma")
            assert await dma.read(8192, 4096) == content[8192:12288]

        run_guest(host.socket, body)
        assert host.stop() == 0
        log = host.log()
    assert "Traceback" not in log and "struct.error" not in log
    refusals = [line for line in log.splitlines() if "rejected io" in line]
    assert len(refusals) == 8 and all("IDE port" in line for line in refusals), log
    assert image.read_bytes() == content
