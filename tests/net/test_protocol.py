"""The NIC's protocol in one process (vmbus.testing): bring-up values,
frames both ways through the buffers, sizes at the edges, link status."""

from __future__ import annotations

import os

import trio

from tests.net.helpers import GUEST_MAC, PEER_MAC, frame, nic_on_switch
from vmbus.protocols import rndis as R


async def test_bring_up_gives_the_hosts_mac_mtu_and_link() -> None:
    async with nic_on_switch() as (pair, _peer):
        nic = pair.guest
        assert nic.mac == GUEST_MAC and nic.mtu == 1500 and nic.link_up
        host = pair.host.snapshot()
        assert host["session"]["rndis_ready"] and host["session"]["packet_filter"] == 0x0D
        assert host["mac"] == GUEST_MAC.hex(":")


async def test_frames_both_ways_keep_their_bytes() -> None:
    async with nic_on_switch() as (pair, peer):
        nic = pair.guest
        sent = [frame(PEER_MAC, GUEST_MAC, os.urandom(n)) for n in (46, 100, 1500 - 14 + 14 - 14, 1000)]
        await nic.send_frames(sent)
        got: list[bytes] = []
        with trio.fail_after(10):
            while len(got) < len(sent):
                got += await peer.receive()
        assert got == sent
        back = [frame(GUEST_MAC, PEER_MAC, os.urandom(n)) for n in range(46, 46 + 300)]
        for f in back:
            peer.switch.forward(peer, f)
        with trio.fail_after(10):
            received = [await nic.receive() for _ in back]
        assert received == back
        counters = pair.host.snapshot()
        assert counters["tx"]["frames"] == len(sent) and counters["rx"]["frames"] == len(back)
        assert counters["rx"]["bytes"] == sum(map(len, back))


async def test_minimum_and_jumbo_frames() -> None:
    async with nic_on_switch(mtu=9000) as (pair, peer):
        nic = pair.guest
        assert nic.mtu == 9000
        smallest = frame(PEER_MAC, GUEST_MAC, b"")  # 14 bytes: a header alone
        largest = frame(PEER_MAC, GUEST_MAC, os.urandom(9000))
        await nic.send_frames([smallest, largest])
        got: list[bytes] = []
        with trio.fail_after(10):
            while len(got) < 2:
                got += await peer.receive()
        assert got == [smallest, largest]
        peer.switch.forward(peer, frame(GUEST_MAC, PEER_MAC, os.urandom(9000)))
        with trio.fail_after(10):
            assert len(await nic.receive()) == 9014
        too_big = frame(GUEST_MAC, PEER_MAC, os.urandom(9001))
        peer.switch.forward(peer, too_big)
        with trio.fail_after(10):
            while pair.host.snapshot()["drops"].get("rx_bad_size", 0) < 1:
                await trio.sleep(0.01)


async def test_frames_not_for_us_are_filtered_and_broadcast_is_not() -> None:
    async with nic_on_switch() as (pair, peer):
        other = bytes.fromhex("00155d0000aa")
        peer.switch.table[other] = peer  # a known MAC elsewhere: the switch would not flood it...
        pair.host.backend.queue.append(frame(other, PEER_MAC, b"x" * 50))  # ...but a frame reaches us anyway
        pair.host.backend._ready.set()
        peer.switch.forward(peer, frame(b"\xff" * 6, PEER_MAC, b"hello" * 10))
        with trio.fail_after(10):
            got = await pair.guest.receive()
        assert got[:6] == b"\xff" * 6
        assert pair.host.snapshot()["drops"]["filtered"] == 1


async def test_link_down_and_up_reach_the_guest() -> None:
    async with nic_on_switch() as (pair, _peer):
        nic = pair.guest
        await pair.host.admin("link", {"state": "down"})
        with trio.fail_after(10):
            while nic.link_up:
                await nic.link_changed.wait()
        await pair.host.admin("link", {"state": "up"})
        with trio.fail_after(10):
            while not nic.link_up:
                await nic.link_changed.wait()
        reply = await nic.rndis(R.query(0, R.OID_GEN_MEDIA_CONNECT_STATUS))
        assert reply.data == b"\0\0\0\0"
