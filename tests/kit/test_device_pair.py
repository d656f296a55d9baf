"""``vmbus.testing``: a device's host and guest halves joined in one process."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from pvbus.devices import ECHO
from ring import PacketType
from vmbus.errors import ChannelClosed
from vmbus.protocols import echo
from vmbus.testing import open_device_pair


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_echo_pair_round_trips_bytes() -> None:
    async with open_device_pair(ECHO) as pair:
        for i in range(50):
            data = os.urandom(1 + i * 37)
            assert await pair.guest.echo(data) == data
        assert pair.host_channel.stats.packets_received == 50
        assert pair.guest_channel.stats.packets_received == 50


async def test_many_requests_in_flight_all_answered() -> None:
    async with open_device_pair(ECHO, ring_pages=1) as pair:  # a small ring: senders wait for room
        results: dict[int, bytes] = {}

        async def one(k: int) -> None:
            results[k] = await pair.guest.echo(k.to_bytes(4, "little") * 200)

        async with trio.open_nursery() as nursery:
            for k in range(64):
                nursery.start_soon(one, k)
        assert results == {k: k.to_bytes(4, "little") * 200 for k in range(64)}


async def test_a_hostile_guest_packet_gets_an_error_status() -> None:
    """Bypass the driver: a request claiming more bytes than it carries."""
    async with open_device_pair(ECHO) as pair:
        out, inc = pair.guest_rings
        pair.guest.requests.fail_all()  # (the driver's reader is not needed here)
        lying = struct.pack("<I", echo.MAX_ECHO + 100) + b"x" * 16
        out.write(lying, trans_id=7, completion_requested=True, packet_type=PacketType.DATA_INBAND)
        if out.commit():
            pair.host_doorbell.ring()
        with trio.fail_after(10):
            while (answer := pair.guest_channel.stats.packets_received) == 0:
                await trio.sleep(0.01)
        # The driver's Requestor consumed the completion as stray (id 7 was never issued).
        assert answer == 1
        assert pair.guest.requests.stray_completions == 1
        # The host is still serving: a good request after the bad one is answered.
        assert await pair.guest.echo(b"still here") == b"still here"


async def test_everything_is_released_after_the_pair_closes() -> None:
    async with open_device_pair(ECHO) as pair:  # first use: imports, trio's wake-up fds
        assert await pair.guest.echo(b"x") == b"x"
    before = open_fds()
    for _ in range(5):
        async with open_device_pair(ECHO) as pair:
            assert await pair.guest.echo(b"x") == b"x"
    assert open_fds() == before
    with pytest.raises(ChannelClosed):
        await pair.guest.echo(b"after close")


async def test_storage_pair_over_a_real_image(tmp_path: Path) -> None:
    """A device whose guest driver hands the host page lists: rings and
    buffers in guest RAM with its page allocator, the host on a real image."""
    import hashlib

    from guest_kernel.memory import GuestRam
    from pvbus.devices import STORAGE

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    ram = GuestRam(16 << 20)
    try:
        async with open_device_pair(STORAGE, config={"path": str(image), "subchannels": 0}, ram=ram) as pair:
            disk = pair.guest
            data = os.urandom(256 << 10)
            await disk.write(4096, data)
            await disk.flush()
            assert await disk.read(4096, len(data)) == data
        on_host = image.read_bytes()[4096 : 4096 + len(data)]
        assert hashlib.sha256(on_host).digest() == hashlib.sha256(data).digest()
    finally:
        ram.close()
