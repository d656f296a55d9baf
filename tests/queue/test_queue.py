"""The queue layer's wake-up rules: the race a single re-check loses, shown
on demand in one process, and the two-process stress (short here; the long
run is ``make stress``)."""

from __future__ import annotations

from typing import Any

import pytest

from ring import IncomingRing, OutgoingRing, PacketType, RingFull, SharedMemory
from ring.queue import EchoReaper, stage_counted
from vmbus.channel import Channel, Requestor
from vmbus.queue import Poller

from .stress import OnceRecheckPoller, run_guest

RING = 4096 + (16 << 10)


async def _never() -> None:
    raise AssertionError("nothing here sleeps")


def _race(poller_class: type[Poller]) -> tuple[list[bool], int, int]:
    """The host publishes a completion while the last poller's reap has taken
    the earlier one but not released it: the host sees a non-empty ring and
    does not signal.  Returns (the host's signal decisions, answers reaped,
    answers left in the ring with the interrupt unmasked)."""
    shm = SharedMemory.create(2 * RING)
    try:
        guest_in = IncomingRing(shm.buf, 0, RING, format=True)
        guest_out = OutgoingRing(shm.buf, RING, RING, format=True)
        host_out = OutgoingRing(shm.buf, 0, RING)
        channel = Channel(1, guest_out, guest_in, lambda: None, _never)
        requestor = Requestor(channel, 8)
        reaper = EchoReaper(guest_in)
        reaped: list[Any] = []
        raced: list[bool] = []

        def reap() -> int:
            got = reaper.reap()
            if got and not raced:  # the host publishes between our take and our release
                host_out.write(b"4" * 8, trans_id=4, packet_type=PacketType.COMPLETION)
                raced.append(host_out.commit())
            if got:
                channel.commit_read(len(got))
            reaped.extend(got)
            return len(got)

        poller = poller_class(requestor, reap, 10)
        holder = object()
        poller.hold(holder)
        host_out.write(b"3" * 8, trans_id=3, packet_type=PacketType.COMPLETION)
        assert host_out.commit() is False  # masked: no signal
        poller.let_go(holder)
        masked = int.from_bytes(bytes(shm.buf[8:12]), "little")
        return raced, len(reaped), guest_in.available if not masked else 0
    finally:
        shm.close()


def test_the_last_poller_rechecks_after_its_own_reap() -> None:
    raced, reaped, stranded = _race(Poller)
    assert raced == [False]  # the host did not signal the second answer
    assert (reaped, stranded) == (2, 0)  # the re-check after the release found it


def test_a_poller_that_rechecks_once_strands_an_answer() -> None:
    """The deliberately broken variant loses the wake-up: the answer sits in
    the ring, unmasked, and no signal will ever come for it."""
    raced, reaped, stranded = _race(OnceRecheckPoller)
    assert raced == [False]
    assert reaped == 1 and stranded > 0


def test_counted_requests_stage_and_echo_in_c() -> None:
    shm = SharedMemory.create(RING)
    try:
        out = OutgoingRing(shm.buf, 0, RING, format=True)
        assert stage_counted(out, 100, 5) == 5
        out.commit()
        inc = IncomingRing(shm.buf, 0, RING)
        got = [(p.trans_id, bytes(p.payload)) for p in iter(inc.read_packet, None)]
        assert got == [(100 + i, (100 + i).to_bytes(8, "little")) for i in range(5)]
    finally:
        shm.close()


@pytest.mark.timeout(120)
async def test_two_process_stress_loses_no_wake_up() -> None:
    outcome = await run_guest(20_000, broken=False)
    assert not outcome.lost_wakeup
    assert outcome.completed == 20_000 and outcome.wrong == 0


def _waiting_pair(shm: SharedMemory) -> tuple[OutgoingRing, IncomingRing, IncomingRing, OutgoingRing]:
    """(peer's producer, our consumer) over ring 0, (peer's consumer, our producer) over ring 1."""
    peer_out = OutgoingRing(shm.buf, 0, RING, format=True)
    peer_in = IncomingRing(shm.buf, RING, RING, format=True)
    return peer_out, IncomingRing(shm.buf, 0, RING), peer_in, OutgoingRing(shm.buf, RING, RING)


def test_the_layer_waits_wake_on_the_peers_signals_and_on_stop() -> None:
    """``Waiter`` (the waits of pv_serve on their own, as the ring benchmark
    uses them): a sleeping ``wait_readable`` is woken by the signal the
    peer's commit asks for and returns masked; a sleeping ``wait_writable``
    by the signal the peer's read commit asks for once there is room; a
    stop wakes either."""
    import os
    import threading

    from ring.queue import SERVE_STOPPED, Waiter

    shm = SharedMemory.create(2 * RING)
    kick = os.eventfd(0, os.EFD_CLOEXEC)  # blocking: the layer must not care
    try:
        peer_out, mine_in, peer_in, mine_out = _waiting_pair(shm)
        waiter = Waiter(mine_in, mine_out, kick)
        results: list[int] = []

        def in_thread(call: Any, *args: Any) -> threading.Thread:
            t = threading.Thread(target=lambda: results.append(call(*args)))
            t.start()
            return t

        t = in_thread(waiter.wait_readable)
        peer_out.write(b"x" * 8, trans_id=1)
        if peer_out.commit():  # empty -> non-empty, unmasked (or already masked: no signal needed)
            os.eventfd_write(kick, 1)
        t.join(60)
        assert not t.is_alive() and results == [0]
        assert int.from_bytes(bytes(shm.buf[8:12]), "little") == 1  # returned masked, for the drain
        assert mine_in.read_packet() is not None
        mine_in.commit()

        # Fill our outgoing ring, then wait for room for one more packet.
        while True:
            try:
                mine_out.write(b"y" * 512, trans_id=2)
            except RingFull:
                break
        mine_out.commit()
        t = in_thread(waiter.wait_writable, 1024)
        taken = 0
        while peer_in.read_packet() is not None:
            taken += 1
        if peer_in.commit():  # the reader's side of pending_send_sz
            os.eventfd_write(kick, 1)
        t.join(60)
        assert not t.is_alive() and results == [0, 0] and taken > 2
        assert mine_out.write_space > 1024

        t = in_thread(waiter.wait_readable)  # nothing will come: only a stop ends it
        waiter.stop()
        t.join(60)
        assert not t.is_alive() and results == [0, 0, SERVE_STOPPED]
        waiter.close()
    finally:
        os.close(kick)
        shm.close()
