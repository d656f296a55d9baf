"""A ring that fills: the guest's sends wait on pending_send_sz and resume
when the host drains, across real processes, with nothing lost."""

from __future__ import annotations

from pathlib import Path

from vmbus.protocols import echo

from ..storage.conftest import run_guest
from .harness import host_process


def test_requests_larger_than_the_ring_wait_for_room(tmp_path: Path) -> None:
    with host_process(tmp_path) as host:

        async def body(kernel) -> tuple[int, int]:  # noqa: ANN001
            drv = kernel.device("echo")
            ring = drv.channel.outgoing
            size = 3000
            count = 3 * ring.data_size // (size + 40)  # three ringfuls, in one call
            items = [(echo.request(bytes([i % 251]) * size), 6, b"") for i in range(count)]
            replies = await drv.requests.request_many(items)
            for i, pkt in enumerate(replies):
                status, data = echo.LENGTH.unpack_from(pkt.payload)[0], bytes(pkt.payload)[4 : 4 + size]
                assert status == echo.STATUS_OK and data == bytes([i % 251]) * size
            return count, drv.channel.stats.ring_full_waits

        count, waits = run_guest(host.socket, body, ram_mib=16)
    assert count > 10 and waits >= 2  # the sender really ran out of room, more than once


def test_polling_channel_still_delivers_everything(tmp_path: Path) -> None:
    """With adaptive polling on, a channel still gets every completion, and
    falls back to the interrupt when nothing comes during the spin."""
    with host_process(tmp_path) as host:

        async def body(kernel) -> tuple[int, int]:  # noqa: ANN001
            drv = kernel.device("echo")
            drv.channel.poll_spins = 200_000
            for i in range(200):
                assert await drv.echo(b"%d" % i) == b"%d" % i
            return drv.channel.polls_hit, drv.channel.stats.wakeups

        hits, wakeups = run_guest(host.socket, body, ram_mib=16)
    assert hits + wakeups >= 200  # each completion came either by polling or by interrupt
