"""Each integration service's host and guest halves joined in one process
(``vmbus.testing``): the services working, and each side facing a hostile peer."""

from __future__ import annotations

import dataclasses
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio

from guest_kernel.drivers.ic_kvp import KvpDriver
from pvbus.devices import HEARTBEAT, KVP, SHUTDOWN, TIMESYNC
from ring import PacketType, RingFull
from vmbus.device import DeviceCommandError, GuestDriver, HostDevice
from vmbus.protocols import ic
from vmbus.testing import DevicePair, open_device_pair

V = ic.Version


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


def unsolicited_reaches(host: Any, count: int) -> Callable[[], bool]:
    """The host has counted ``count`` answers to nothing."""
    return lambda: bool(host.counters["unsolicited"] == count)


def guest_sends(pair: DevicePair, payload: bytes, trans_id: int = 0, packet_type: int = PacketType.DATA_INBAND) -> None:
    """Bypass the guest driver: a packet straight into the guest -> host ring."""
    out, _ = pair.guest_rings
    out.write(payload, trans_id=trans_id, packet_type=packet_type)
    if out.commit():
        pair.host_doorbell.ring()


def answer(msgtype: int, body: bytes, status: int = ic.Status.OK) -> bytes:
    return ic.encode_message(msgtype, body, framework=V(3, 0), version=V(4, 0), status=status,
                             flags=ic.RESPONSE_FLAGS)


# -- the services -------------------------------------------------------------------------


async def test_heartbeat_counts_beats_and_reports_a_silent_guest_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="host_drivers.ic.heartbeat")
    async with open_device_pair(HEARTBEAT, config={"interval": 0.05}) as pair:
        await until(lambda: pair.host.beats_answered >= 3)
        snap = pair.host.snapshot()
        assert snap["state"] == "ready" and snap["health"] == "alive" and snap["version"] == "3.0"
        assert snap["sequence"] >= 3 and snap["last_seen"] is not None and snap["missed"] == 0
        assert pair.guest.sequence in (snap["sequence"], snap["sequence"] - 1)
        before = time.time()
        pair.guest_channel.close()  # the guest stops answering
        await until(lambda: pair.host.health == "lost")
        assert pair.host.missed >= 3 and pair.host.last_seen <= before
        await until(lambda: pair.host.missed >= 6)  # still silent: no second report
        lost_lines = [r for r in caplog.records if "reported lost" in r.getMessage()]
        assert len(lost_lines) == 1


async def test_shutdown_request_reaches_the_guest_after_its_answer() -> None:
    async with open_device_pair(SHUTDOWN) as pair:
        await until(lambda: pair.host.state == "ready")
        assert pair.host.version == V(3, 2)
        assert not pair.guest.requested.is_set()
        result = await pair.host.admin("shutdown", {"reboot": True, "force": True})
        assert result == {"action": "reboot", "force": True}
        await until(pair.guest.requested.is_set)
        assert pair.guest.request is not None and pair.guest.request.reboot and pair.guest.request.force
        assert pair.host.snapshot()["requests_answered"] == 1
        for bad in ({"reboot": 1}, {"reboot": True, "now": True}, {"force": "yes"}):
            with pytest.raises(DeviceCommandError):
                await pair.host.admin("shutdown", bad)
        with pytest.raises(DeviceCommandError, match="no command"):
            await pair.host.admin("restart", {})


async def test_timesync_offset_follows_the_host_clock() -> None:
    async with open_device_pair(TIMESYNC) as pair:
        await pair.guest.synced.wait()
        assert abs(pair.guest.offset) < 1e-3
        before, now, after = time.time(), pair.guest.now(), time.time()
        assert before - 1e-3 < now < after + 1e-3
    ahead = 5_000_000_000  # a host clock 5 s ahead of this machine's
    async with open_device_pair(TIMESYNC, config={"clock": lambda: time.time_ns() + ahead, "interval": 0.05}) as pair:
        await until(lambda: pair.guest.samples >= 3)
        assert abs(pair.guest.offset_ns - ahead) < 1_000_000
        before, now, after = time.time(), pair.guest.now(), time.time()
        assert before + 5 - 1e-3 < now < after + 5 + 1e-3
        assert pair.host.samples_answered >= 2 and pair.guest.version == V(4, 0)


async def test_kvp_both_ways_and_its_limits() -> None:
    async with open_device_pair(KVP) as pair:
        host, guest = pair.host, pair.guest
        await until(lambda: host.state == "ready" and host.pools[ic.Pool.GUEST])
        # The guest's identity, enumerated by the host right after negotiation.
        published = host.pools[ic.Pool.GUEST]
        assert {"FullyQualifiedDomainName", "OSName", "NetworkAddressIPv4"} <= set(published)
        # host -> guest
        await host.admin("set", {"key": "role", "value": "database ü"})
        assert await guest.get("external", "role") == "database ü"
        assert (await host.admin("get", {"pool": "external", "key": "role"}))["value"] == "database ü"
        # guest -> host
        await guest.set("guest", "status", "ready")
        assert (await host.admin("get", {"key": "status"}))["value"] == "ready"
        listed = await host.admin("list", {"pool": "guest"})
        assert listed["items"]["status"] == "ready" and listed["items"] == guest.items("guest")
        # delete, and what is not there
        await host.admin("delete", {"pool": "external", "key": "role"})
        assert await guest.get("external", "role") is None
        with pytest.raises(DeviceCommandError, match="no key"):
            await host.admin("get", {"pool": "external", "key": "role"})
        # the limits: 255 UTF-16 units plus the NUL for a key, 1023 for a value
        await host.admin("set", {"key": "k" * 255, "value": "v" * 1023})
        assert await guest.get("external", "k" * 255) == "v" * 1023
        sent = pair.host_channel.stats.packets_sent
        for args in ({"key": "k" * 256, "value": "v"}, {"key": "k", "value": "v" * 1024}):
            with pytest.raises(DeviceCommandError, match="at most"):
                await host.admin("set", args)
        assert pair.host_channel.stats.packets_sent == sent  # refused before anything was sent
        with pytest.raises(ValueError):
            await guest.set("guest", "k" * 256, "v")
        with pytest.raises(DeviceCommandError, match="no KVP pool"):
            await host.admin("list", {"pool": "nowhere"})
        assert host.snapshot()["pools"]["external"] == 1
        assert host.snapshot()["pools"]["guest"] == len(guest.items("guest"))


async def test_guest_program_waits_for_a_host_value() -> None:
    async with open_device_pair(KVP) as pair:
        await until(lambda: pair.host.state == "ready")
        got: list[str] = []

        async def program() -> None:
            got.append(await pair.guest.wait_for("external", "go"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(program)
            await trio.sleep(0.05)
            assert not got
            await pair.host.set(ic.Pool.EXTERNAL, "go", "now")
        assert got == ["now"]


# -- a hostile guest against the host ---------------------------------------------------------


async def test_bad_messages_from_the_guest_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="host_drivers.ic.service")
    async with open_device_pair(KVP) as pair:
        host = pair.host
        await until(lambda: host.state == "ready")
        good = answer(ic.MsgType.KVP, bytes(100))
        bad = [
            good[:20],  # shorter than the header
            good[:18] + struct.pack("<H", 200) + good[20:],  # icmsgsize past the bytes present
            struct.pack("<II", 1, 9000) + good[8:],  # pipe msgsize past the packet
            ic.encode_message(ic.MsgType.KVP, b"", flags=ic.REQUEST_FLAGS),  # a request, not an answer
            ic.encode_message(ic.MsgType.KVP, b"", flags=ic.RESPONSE_FLAGS, transaction_id=3),
        ]
        for payload in bad:
            guest_sends(pair, payload)
        guest_sends(pair, good, packet_type=PacketType.COMPLETION)
        await until(lambda: host.counters["bad_messages"] == len(bad) + 1)
        assert host.counters["unsolicited"] == 0
        assert len([r for r in caplog.records if "not a response" in r.getMessage() or "malformed" in
                    r.getMessage() or "packet type" in r.getMessage()]) == 1
        assert await host.get(ic.Pool.GUEST, "OSName")  # still serving


async def test_a_flood_of_answers_to_nothing_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="host_drivers.ic.service")
    async with open_device_pair(KVP) as pair:
        host = pair.host
        await until(lambda: host.state == "ready" and host.pools[ic.Pool.GUEST])
        stray = answer(ic.MsgType.KVP, bytes(ic.KVP_BODY_SIZE))
        sent = 0
        out, _ = pair.guest_rings
        while sent < 300:
            try:
                out.write(stray, trans_id=1000 + sent)
                sent += 1
            except RingFull:
                if out.commit():
                    pair.host_doorbell.ring()
                await until(unsolicited_reaches(host, sent))
        if out.commit():
            pair.host_doorbell.ring()
        await until(lambda: host.counters["unsolicited"] == 300)
        assert len([r for r in caplog.records if "no outstanding request" in r.getMessage()]) == 1
        await host.set(ic.Pool.EXTERNAL, "after", "flood")
        assert await pair.guest.get("external", "after") == "flood"


class Stranger(KvpDriver):
    """Speaks no KVP version the host offers: answers 0/0."""

    VERSIONS = (V(9, 9),)  # type: ignore[assignment]  # deliberately unlike the real list


async def test_a_guest_with_unknown_versions_turns_the_service_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="host_drivers.ic.service")
    spec = dataclasses.replace(KVP, guest=Stranger)
    async with open_device_pair(spec) as pair:
        await until(lambda: pair.host.state == "incompatible")
        with pytest.raises(DeviceCommandError, match="incompatible"):
            await pair.host.admin("get", {"key": "OSName"})
        assert [r.getMessage() for r in caplog.records if "negotiation failed" in r.getMessage()]


async def test_a_negotiation_answer_outside_the_offer_is_refused() -> None:
    silent = dataclasses.replace(KVP, guest=GuestDriver)  # only the raw answers below speak for the guest
    async with open_device_pair(silent) as pair:
        await until(lambda: pair.host.outstanding is not None)  # the NEGOTIATE is out
        guest_sends(pair, answer(ic.MsgType.NEGOTIATE, ic.negotiate_answer((V(3, 0), V(7, 7)))),
                    trans_id=pair.host.outstanding)
        await until(lambda: pair.host.state == "incompatible")
        assert pair.host.version is None


async def test_oversized_kvp_fields_in_a_guest_answer_are_refused() -> None:
    async with open_device_pair(KVP) as pair:
        host = pair.host
        await until(lambda: host.state == "ready" and host.pools[ic.Pool.GUEST] and host.outstanding is None)
        pair.guest.channel.close()  # the guest's answers are written by hand from here
        before = host.counters["bad_messages"]

        async def ask() -> None:
            with pytest.raises(DeviceCommandError, match="malformed"):
                await host.get(ic.Pool.GUEST, "OSName")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await until(lambda: host.outstanding is not None)
            tid = host.outstanding
            body = bytes([ic.KvpOp.GET, 1, 0, 0]) + ic.KVP_VALUE.pack(1, 600, 2, b"a\0" * 256, b"\0\0")
            guest_sends(pair, answer(ic.MsgType.KVP, body), trans_id=tid)
        assert host.counters["bad_messages"] == before + 1


# -- a hostile host against the guest ---------------------------------------------------------


class RecordingHost(HostDevice):
    """Takes every packet the guest sends; the test writes the requests."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.packets: list[Any] = []

    async def serve(self, channel: Any, memory: Any) -> None:
        while True:
            self.packets.extend(await channel.receive())


async def host_asks(pair: DevicePair, msgtype: int, body: bytes, trans_id: int, **kw: Any) -> ic.IcMessage | None:
    """Send one request as the host; the guest's answer (None if it dropped it)."""
    before = len(pair.host.packets) + pair.guest.dropped
    payload = kw.pop("raw", None) or ic.encode_message(msgtype, body, **kw)
    await pair.host_channel.send(payload, trans_id=trans_id)
    await until(lambda: len(pair.host.packets) + pair.guest.dropped > before)
    if not pair.host.packets or pair.host.packets[-1].trans_id != trans_id:
        return None
    pkt = pair.host.packets[-1]
    assert pkt.type == PacketType.DATA_INBAND
    return ic.parse_message(pkt.payload)


async def test_the_guest_answers_or_drops_hostile_requests() -> None:
    spec = dataclasses.replace(KVP, host=RecordingHost)
    async with open_device_pair(spec) as pair:
        guest = pair.guest
        # Before negotiation a service request is answered FAIL.
        got = await host_asks(pair, ic.MsgType.KVP, ic.encode_kvp(ic.KvpOp.GET, 1, key="OSName"), 1)
        assert got is not None and got.status == ic.Status.FAIL
        # 101 versions: counts 0/0, nothing negotiated.
        hostile = struct.pack("<HHI", 101, 1, 0) + b"\0\0\x03\0" * 102
        got = await host_asks(pair, ic.MsgType.NEGOTIATE, hostile, 2)
        assert got is not None and ic.parse_negotiate(got.body) == ([], []) and guest.version is None
        offered = ic.encode_negotiate((V(1, 0), V(3, 0)), (V(3, 0), V(4, 0)))
        got = await host_asks(pair, ic.MsgType.NEGOTIATE, offered, 3)
        assert got is not None and got.is_response and len(got.body) == 0x10
        assert ic.parse_negotiate(got.body) == ([V(3, 0)], [V(4, 0)]) and guest.version == V(4, 0)
        # A header that lies about its size is dropped, unanswered.
        lying = ic.encode_message(ic.MsgType.KVP, bytes(64))
        lying = lying[:18] + struct.pack("<H", 5000) + lying[20:]
        dropped = guest.dropped
        assert await host_asks(pair, 0, b"", 4, raw=lying) is None and guest.dropped == dropped + 1
        # An oversized key is refused, and the pool is unchanged.
        body = bytes([ic.KvpOp.SET, 0, 0, 0]) + ic.KVP_VALUE.pack(1, 1024, 4, b"a\0" * 256, b"v\0\0\0")
        got = await host_asks(pair, ic.MsgType.KVP, body, 5)
        assert got is not None and got.status == ic.Status.FAIL and guest.items("external") == {}
        # IP configuration and unknown operations: NOT_SUPPORTED; unknown pools: INVALID_ARG.
        got = await host_asks(pair, ic.MsgType.KVP, bytes([ic.KvpOp.GET_IP_INFO, 0]) + bytes(7426), 6)
        assert got is not None and got.status == ic.Status.NOT_SUPPORTED
        got = await host_asks(pair, ic.MsgType.KVP, ic.encode_kvp(ic.KvpOp.GET, 4, key="x"), 7)
        assert got is not None and got.status == ic.Status.INVALID_ARG
        # Another service's message type: FAIL.
        got = await host_asks(pair, ic.MsgType.SHUTDOWN, ic.encode_shutdown(reboot=False, force=False), 8)
        assert got is not None and got.status == ic.Status.FAIL and got.msgtype == ic.MsgType.SHUTDOWN
        # Enumeration ends with NO_MORE_ITEMS.
        count = len(guest.items("guest"))
        got = await host_asks(pair, ic.MsgType.KVP, ic.encode_kvp(ic.KvpOp.ENUMERATE, 1, index=count), 9)
        assert got is not None and got.status == ic.Status.NO_MORE_ITEMS


async def test_the_guest_refuses_shutdown_flags_it_does_not_know() -> None:
    spec = dataclasses.replace(SHUTDOWN, host=RecordingHost)
    async with open_device_pair(spec) as pair:
        offer = ic.encode_negotiate(ic.FRAMEWORK_VERSIONS_HOST, ic.SHUTDOWN_VERSIONS[0])
        got = await host_asks(pair, ic.MsgType.NEGOTIATE, offer, 1)
        assert got is not None and ic.parse_negotiate(got.body) == ([V(3, 0)], [V(3, 2)])
        hibernate = struct.pack("<III", 0, 0, ic.SHUTDOWN_HIBERNATE) + bytes(2048)
        got = await host_asks(pair, ic.MsgType.SHUTDOWN, hibernate, 2)
        assert got is not None and got.status == ic.Status.FAIL
        got = await host_asks(pair, ic.MsgType.SHUTDOWN, bytes(100), 3)  # too short
        assert got is not None and got.status == ic.Status.FAIL
        assert not pair.guest.requested.is_set()
        got = await host_asks(pair, ic.MsgType.SHUTDOWN, ic.encode_shutdown(reboot=False, force=False), 4)
        assert got is not None and got.status == ic.Status.OK
        await until(pair.guest.requested.is_set)
        assert not pair.guest.request.reboot
