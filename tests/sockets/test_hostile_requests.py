"""A hostile guest on the sockets device's request channel, in one process
(``vmbus.testing``): malformed connect requests and floods are counted and
answered (or dropped) without harm, and the device goes on serving."""

from __future__ import annotations

import struct

import pytest
import trio

from pvbus.devices import SOCKETS
from ring import PacketType
from vmbus.protocols import hvsock
from vmbus.testing import open_device_pair

UNSERVED = 4444


def request(port: int, local: int = 1024) -> bytes:
    return hvsock.ConnectRequest(hvsock.port_to_guid(local), hvsock.port_to_guid(port)).encode()


async def until(condition: object, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await trio.sleep(0.01)


async def test_malformed_connect_requests_are_counted_and_the_device_goes_on() -> None:
    async with open_device_pair(SOCKETS, config={"services": ""}) as pair:
        good = request(UNSERVED)
        wrong_op = struct.pack("<I", 99) + good[4:]
        await pair.guest_channel.send_many([
            # 8 bytes short (the ring pads a payload to 8, so one byte short would not be)
            (good[: hvsock.CONNECT_REQUEST.size - 8], 1001, True, PacketType.DATA_INBAND, b""),
            (wrong_op, 1002, True, PacketType.DATA_INBAND, b""),
            (b"", 1003, True, PacketType.DATA_INBAND, b""),
            (good, 0, False, PacketType.DATA_INBAND, b""),  # nowhere to answer
            (good, 1004, True, PacketType.COMPLETION, b""),  # not a request at all
        ])
        counters = pair.host.counters
        await until(lambda: counters["bad_connect_requests"] == 3 and counters["bad_control_packets"] == 2)
        with pytest.raises(ConnectionRefusedError, match="port 4444"):
            await pair.guest.connect(UNSERVED)
        assert counters["refused_no_service"] == 1
        assert pair.host.connections == set() and pair.host.requests_in_flight == 0


async def test_a_flood_of_requests_is_answered_or_dropped_and_never_blocks_the_host() -> None:
    """2000 requests whose answers the guest does not wait for: each is
    refused (its answer dropped when the guest's ring is full, never
    waited for), and a real connect afterwards gets its own answer."""
    flood = 2000
    async with open_device_pair(SOCKETS, config={"services": ""}, ring_pages=2) as pair:
        for start in range(0, flood, 100):
            await pair.guest_channel.send_many(
                [(request(UNSERVED, 1024 + i), 10_000 + i, True, PacketType.DATA_INBAND, b"")
                 for i in range(start, start + 100)])
        counters = pair.host.counters
        await until(lambda: counters["refused_no_service"] == flood)
        with pytest.raises(ConnectionRefusedError):
            await pair.guest.connect(UNSERVED)
        assert counters["refused_no_service"] == flood + 1
        assert pair.host.connections == set() and pair.host.requests_in_flight == 0
        # Every answer the guest got for the flood was a stray completion to it.
        assert pair.guest.requests.stray_completions + counters["answers_dropped_ring_full"] == flood


@pytest.mark.parametrize("text", ["CONNECT", "CONNECT \n", "connect 2147483648", "CONNECT x" * 10, "HELLO 80",
                                  "CONNECT 12-34", b"CONNECT \xff1".decode("latin-1")])
def test_connect_lines_that_name_no_port_are_refused(text: str) -> None:
    assert hvsock.parse_connect_line(text.encode("latin-1")) is None


def test_connect_lines_name_a_port_or_a_guid_in_any_case() -> None:
    assert hvsock.parse_connect_line(b"connect 80") == hvsock.port_to_guid(80)
    guid = hvsock.port_to_guid(0x7FFFFFFF)
    assert hvsock.parse_connect_line(f"CONNECT {guid}".encode()) == guid
