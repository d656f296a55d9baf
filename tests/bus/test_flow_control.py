"""A ring that fills: the guest's sends wait on pending_send_sz and resume
when the host drains, across real processes, with nothing lost."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from vmbus.channel import Channel
from vmbus.protocols import echo

from ..ring.helpers import make_pair
from ..storage.helpers import run_guest
from .harness import host_process


def test_requests_larger_than_the_ring_wait_for_room(tmp_path: Path) -> None:
    """Ten ringfuls in one call.  The sender never yields to the event loop
    except to wait for room, and until it yields nobody reads the replies:
    the host can take at most a ringful of requests, hold one batch and fill
    the reply ring before it must stop.  So whatever the scheduling, the
    sender runs out of room at least once, and every reply comes back
    intact and in order."""
    with host_process(tmp_path) as host:

        async def body(kernel) -> tuple[int, int, int]:  # noqa: ANN001
            drv = kernel.device("echo")
            ring = drv.channel.outgoing
            size = 3000
            per_ring = ring.data_size // (size + 40)
            count = 10 * per_ring
            items = [(echo.request(bytes([i % 251]) * size), 6, b"") for i in range(count)]
            replies = await drv.requests.request_many(items)
            assert len(replies) == count
            for i, pkt in enumerate(replies):
                status, data = echo.LENGTH.unpack_from(pkt.payload)[0], bytes(pkt.payload)[4 : 4 + size]
                assert status == echo.STATUS_OK and data == bytes([i % 251]) * size
            return count, per_ring, drv.channel.stats.ring_full_waits

        count, per_ring, waits = run_guest(host.socket, body, ram_mib=16)
    # more than the ring, a held batch and the reply ring together could take
    assert count > 3 * per_ring + 3
    assert waits >= 1  # the sender really ran out of room and resumed


def test_polling_channel_still_delivers_everything(tmp_path: Path) -> None:
    """With adaptive polling on, a channel still gets every completion, right
    and in order.  (Which path brought each one, the spin, the re-check at
    unmask or the interrupt, is up to the scheduler: the branches themselves
    are checked one by one below.)"""
    with host_process(tmp_path) as host:

        async def body(kernel) -> tuple[int, int]:  # noqa: ANN001
            drv = kernel.device("echo")
            drv.channel.poll_spins = 200_000
            for i in range(200):
                assert await drv.echo(b"%d" % i) == b"%d" % i
            return drv.channel.polls_hit, drv.channel.stats.wakeups

        hits, wakeups = run_guest(host.socket, body, ram_mib=16)
    assert 0 <= hits <= 200 and 0 <= wakeups  # counters sane; delivery is the point


def _polling_channel(spins: int, on_wait: Callable[[], None]) -> tuple[Channel, Any]:
    pair = make_pair("c", 4096)

    async def wait() -> None:
        on_wait()
        await trio.lowlevel.checkpoint()

    channel = Channel(1, pair.out, pair.inc, lambda: None, wait)
    channel.poll_spins = spins
    return channel, pair.out


def _publish(out: Any, data: bytes) -> None:
    out.write(data)
    out.commit()


async def test_a_packet_that_arrives_during_the_spin_is_taken_without_an_interrupt() -> None:
    channel, out = _polling_channel(1000, lambda: pytest.fail("slept although a packet was there"))
    calls = 0

    def take() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            _publish(out, b"late")  # lands after the drain looked, before the spin
            return None
        pkt = channel.incoming.read_packet()
        if pkt is None:
            return None
        data = bytes(pkt.payload)
        channel.commit_read(1)
        return data

    assert (await channel.drain(take))[:4] == b"late"
    assert (channel.polls_hit, channel.stats.wakeups) == (1, 0)


async def test_a_spin_that_finds_nothing_falls_back_to_the_interrupt() -> None:
    published: list[bytes] = []

    def interrupt() -> None:  # the peer publishes while we sleep, then signals
        _publish(out, b"woken")
        published.append(b"woken")

    channel, out = _polling_channel(1000, interrupt)
    (pkt,) = await channel.receive()
    assert bytes(pkt.payload)[:5] == b"woken" and published == [b"woken"]
    assert (channel.polls_hit, channel.stats.wakeups) == (0, 1)
