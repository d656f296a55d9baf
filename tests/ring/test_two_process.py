"""Two real processes, one memfd, eventfd doorbells: a million packets of
mixed sizes (12 B to 64 KiB), each checked for sequence, size and bytes,
plus a chained CRC-32 of the whole stream.  Nothing lost, nothing
duplicated, nothing corrupted; and the signalling stays cheap."""

from __future__ import annotations

import pytest

from pvbus.bench import workload
from pvbus.bench.ringpair import RingPair, checked_crc
from pvbus.bench.runner import run_roles


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 8 s alone, several times that on a loaded machine
def test_one_million_mixed_packets_between_processes() -> None:
    count, seed = 1_000_000, 11
    pair = RingPair(data_size=1 << 20)
    try:
        prod, cons = run_roles(
            pair,
            [("produce_checked", {"count": count, "seed": seed}), ("consume_checked", {"count": count, "seed": seed})],
            timeout=240,
        )
    finally:
        pair.close()
    assert prod["sent"] == count
    assert cons["received"] == count
    assert cons["bad"] == 0
    assert cons["crc"] == checked_crc(count, seed)
    # The producer commits every 32 packets and signals only when a commit
    # finds the consumer asleep on an empty ring; the consumer signals only
    # when the producer waits for room.  However the two are scheduled, that
    # stays far below a signal per packet (at worst about one per commit).
    assert (prod["signals"] + cons["signals"]) / count < 1 / 16


@pytest.mark.parametrize("polling", [False, True])
def test_batched_stream_and_round_trips(polling: bool) -> None:
    from pvbus.bench.ringbench import RingTransport

    count, size = 200_000, 64
    transport = RingTransport(polling, size)
    try:
        prod, cons = run_roles(
            transport,
            [("produce", {"count": count, "size": size, "batch": 512}),
             ("consume", {"count": count, "size": size, "batch": 512})],
        )
    finally:
        transport.close()
    assert cons["received"] == count and cons["crc"] == workload.expected_crc(count, size)
    assert (prod["signals"] + cons["signals"]) / count <= 0.01

    transport = RingTransport(polling, size)
    try:
        ping, pong = run_roles(
            transport, [("ping", {"iterations": 2000, "size": 64}), ("pong", {"iterations": 2000, "size": 64})]
        )
    finally:
        transport.close()
    assert len(ping["rtt_ns"]) == 2000  # ping checks every echo's id and bytes itself
