"""The four kinds of virtualization move the same bytes, and the exits the
benchmark reports are the ones both processes counted."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio

from guest_kernel.memory import DmaBuffer
from pvbus.bench.blockload import Workload, run_trapped
from vmbus.host import admin_request

from ..bus.harness import host_process
from ..storage.helpers import run_guest

MiB = 1 << 20


def test_every_mode_reads_and_writes_the_same_bytes(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(4 * MiB))
    with host_process(tmp_path, "--disk", str(image), "--emulated-disks") as host:

        async def body(kernel) -> dict[str, str]:  # noqa: ANN001
            pv = kernel.device("storage")
            dma, ide = await kernel.emulated_disk("dma"), await kernel.emulated_disk("ide")
            assert pv.capacity == dma.capacity == ide.capacity == 4 * MiB
            digests = {}
            off, n = 3 * MiB + 8192, 16384
            digests["paravirt"] = hashlib.sha256(await pv.read(off, n)).hexdigest()
            with DmaBuffer(kernel.ram, n) as buf:
                await dma.transfer(False, off, buf)
                digests["fullvirt"] = hashlib.sha256(buf.view).hexdigest()
            digests["emulated"] = hashlib.sha256(await ide.read(off, n)).hexdigest()
            # each mode writes its own block; every other mode reads it back
            blocks = {"paravirt": os.urandom(4096), "fullvirt": os.urandom(4096), "emulated": os.urandom(4096)}
            await pv.write(0, blocks["paravirt"])
            await dma.write(4096, blocks["fullvirt"])
            await ide.write(8192, blocks["emulated"])
            await pv.flush()
            for i, data in enumerate(blocks.values()):
                assert await pv.read(i * 4096, 4096) == data
                assert await dma.read(i * 4096, 4096) == data
                assert await ide.read(i * 4096, 4096) == data
            return digests

        digests = run_guest(host.socket, body)
    with open(image, "rb") as f:
        f.seek(3 * MiB + 8192)
        native = hashlib.sha256(f.read(16384)).hexdigest()
    assert set(digests.values()) == {native}


def test_reported_exits_are_the_counted_exits(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4 * MiB))
    # only the disk: the integration services' own traffic (heartbeats...) would
    # add exits the guest makes on its own schedule
    with host_process(tmp_path, "--disk", str(image), "--emulated-disks", "--device", "storage") as host:

        async def host_exits() -> int:
            return sum((await admin_request(host.socket, {"cmd": "inspect"}))["partitions"][0]["exits"].values())

        async def body(kernel) -> list[tuple[str, int, int, float, float]]:  # noqa: ANN001
            out = []
            for mode in ("fullvirt", "emulated"):
                disk = await kernel.emulated_disk("dma" if mode == "fullvirt" else "ide")
                before_g = sum(kernel.hypercalls.exits.values())
                before_h = await host_exits()
                rec = await run_trapped(kernel, Workload("randread", 4096, 1, 4 * MiB, runtime=0.2, ramp=0), mode,
                                        disk)
                # The interrupt task's end-of-message exit may still be on its
                # way when the window closes: both sides agree once it lands.
                with trio.fail_after(30):
                    while True:
                        after_g = sum(kernel.hypercalls.exits.values())
                        after_h = await host_exits()
                        if after_g - before_g == after_h - before_h:
                            break
                        await trio.sleep(0.01)
                # the inspect round trips are admin-socket traffic, not exits
                out.append((mode, after_g - before_g, after_h - before_h, rec["exits_per_io"] * rec["ios"], rec["ios"]))
            return out

        for mode, guest_exits, host_exits, reported, ios in run_guest(host.socket, body):
            assert guest_exits == host_exits, mode  # what the guest made is what the host answered
            # all the window counted, short by at most the last interrupts' EOMs
            assert guest_exits - 2 - 1e-6 <= reported <= guest_exits + 1e-6, mode
            assert ios > 0  # emulated I/O may end mid-request: counted by bytes moved
