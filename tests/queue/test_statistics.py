"""Queue statistics come from the layer, once: the host storage device's
``snapshot`` (what ``pvbus inspect`` shows under the primary channel's
``device_state``) lists every queue served in C with the ``pv_server``
counters and the disk's, and a guest queue's ``Poller.snapshot`` gives its
``PollerStatistics``.  Counts are checked against the I/O done, never
against a number of wake-ups (those depend on scheduling)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from guest_kernel.memory import GuestRam
from pvbus.devices import STORAGE
from ring.queue import SERVER_COUNTERS
from vmbus.queue import PollerStatistics
from vmbus.testing import open_device_pair


async def test_storage_snapshot_shows_the_queue_layer_counters(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    data = os.urandom(64 << 10)
    ram = GuestRam(16 << 20)
    try:
        async with open_device_pair(STORAGE, config={"path": str(image), "subchannels": 0}, ram=ram) as pair:
            disk: Any = pair.guest  # the storvsc driver
            host: Any = pair.host  # the storvsp
            (before,) = host.snapshot()["queues"]  # after the driver's own probing (punted to Python)
            for i in range(8):
                await disk.write(i * len(data), data)
            for i in range(8):
                assert await disk.read(i * len(data), len(data)) == data
            state = host.snapshot()
            json.dumps(state)  # inspect sends it as JSON
            (queue,) = state["queues"]
            assert set(SERVER_COUNTERS) | {"requests", "bytes_read", "bytes_written"} <= set(queue)
            assert queue["relid"] == pair.host_channel.relid and queue["sub_channel"] == 0
            # Every regular request went through the C handler; none was punted.
            assert queue["requests"] - before["requests"] == queue["served"] - before["served"] == 16
            assert queue["punted"] == before["punted"]
            assert queue["bytes_written"] - before["bytes_written"] == 8 * len(data)
            assert queue["bytes_read"] - before["bytes_read"] == 8 * len(data)
            assert queue["publishes"] >= 1
            guest = disk.queues[0].poller.snapshot()
            assert set(vars(PollerStatistics())) <= set(guest) and guest["outstanding"] == 0
        assert host.snapshot()["queues"] == []  # a channel no longer served is no longer listed
    finally:
        ram.close()
