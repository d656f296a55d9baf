"""The emulated controllers distrust the guest too: a DMA address outside
guest RAM, a range past the disk, a command the device does not know, data
port reads with no command: error statuses, nothing touched, still serving."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guest_kernel.drivers.dmadisk import ADDR, CMD, COUNT, DOORBELL, INT_ACK, LBA, READ, STATUS, DmaDiskError
from guest_kernel.drivers.ide import BASE, COMMAND, DATA, FEATURES, IdeError

from ..bus.harness import host_process
from ..storage.helpers import run_guest

MiB = 1 << 20


def test_emulated_devices_refuse_bad_requests(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    content = os.urandom(2 * MiB)
    image.write_bytes(content)
    with host_process(tmp_path, "--disk", str(image), "--emulated-disks") as host:

        async def body(kernel) -> None:  # noqa: ANN001
            dma = await kernel.emulated_disk("dma")
            hc = kernel.hypercalls
            # DMA into memory the guest does not have
            for reg, value in ((CMD, READ), (LBA, 0), (COUNT, 8), (ADDR, 1 << 40)):
                await hc.io(0x1000 + reg, 8, write=True, value=value)
            await hc.io(0x1000 + DOORBELL, 8, write=True, value=1)
            assert await hc.io(0x1000 + STATUS, 8) & 0x2  # error
            await hc.io(0x1000 + INT_ACK, 8, write=True, value=1)
            # past the end of the disk, an unknown command, too many blocks
            with pytest.raises(DmaDiskError):
                await dma.read(2 * MiB, 4096)
            with pytest.raises(DmaDiskError):
                await dma._command(9, 0, 1, 4096)
            with pytest.raises(DmaDiskError):
                await dma._command(1, 0, 4096, 4096)
            # unaligned and odd-sized register accesses read as floating bus
            assert await hc.io(0x1000 + 3, 8) == (1 << 64) - 1
            assert await hc.io(0x1000 + STATUS, 4) == 0xFFFFFFFF
            ide = await kernel.emulated_disk("ide")
            assert await hc.io(BASE + DATA, 2) == 0xFFFF  # no command: no data
            await hc.io(BASE + COMMAND, 1, write=True, value=0x99)  # unknown command
            assert await hc.io(BASE + COMMAND, 1) & 0x01 and await hc.io(BASE + FEATURES, 1) == 0x04
            with pytest.raises(IdeError):
                await ide.read(2 * MiB, 512)  # past the end: IDNF
            # a port nothing decodes
            assert await hc.io(0x3000, 1) == 0xFF
            # still serving, and nothing was written
            assert await dma.read(0, 4096) == content[:4096]
            assert await ide.read(512, 512) == content[512:1024]

        run_guest(host.socket, body)
    assert image.read_bytes() == content
