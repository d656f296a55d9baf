"""A hostile guest against the NIC's host half: bad section indexes,
lengths past the buffers, pages outside guest RAM, oversized per-packet
info, malformed and out-of-order NVSP and RNDIS, stray completions, a SET
of an OID outside the allow-list (CVE-2021-28476).  Each is refused (FAIL
or a counted drop) and the NIC, the host and the other guests go on."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from guest_kernel.drivers.netvsc import BIG_TID
from ring import GpaRange, PacketType, encode_gpa_direct_header
from tests.bus.harness import host_process
from tests.net.helpers import GUEST_MAC, PEER_MAC, frame, need_network_privileges, netns, nic_on_switch
from tests.net.test_processes import guest, in_ns
from vmbus.protocols import netvsc as N
from vmbus.protocols import rndis as R

SECTION = 150  # a send section the driver is not using in these tests


def rndis_send(index: int, size: int) -> bytes:
    return N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, N.CHANNEL_DATA, index, size)


def hostile_requests(nic: object, ram_pages: int) -> list[tuple[bytes, int, bytes]]:
    """(payload, packet type, header) of each bad request, in order."""
    tx = nic._tx  # type: ignore[attr-defined]
    good = R.packet_header(60) + frame(PEER_MAC, GUEST_MAC, bytes(46))
    # A PACKET_MSG whose per-packet info claims 1000 bytes (more than the message and the cap).
    big_ppi = bytearray(good)
    struct.pack_into("<II", big_ppi, 28, 36, 1000)
    # A PACKET_MSG whose frame runs past msg_len.
    past_end = bytearray(good)
    struct.pack_into("<I", past_end, 12, 5000)
    # A QUERY whose input buffer offset points past the message.
    bad_query = bytearray(R.query(7, R.OID_GEN_MAXIMUM_FRAME_SIZE, b"abcd"))
    struct.pack_into("<I", bad_query, 20, 4000)
    cases: list[tuple[bytes, int, bytes]] = []

    def in_section(msg: bytes) -> None:  # a section each: the host reads them later
        section = SECTION + len(cases)
        start = section * N.SEND_SECTION_SIZE
        tx[start : start + len(msg)] = msg
        cases.append((rndis_send(section, len(msg)), PacketType.DATA_INBAND, b""))

    cases.append((rndis_send(10_000, 100), PacketType.DATA_INBAND, b""))  # section index past the buffer
    cases.append((rndis_send(SECTION, N.SEND_SECTION_SIZE + 1), PacketType.DATA_INBAND, b""))  # size past a section
    cases.append((rndis_send(SECTION, 0), PacketType.DATA_INBAND, b""))  # nothing in it
    in_section(bytes(big_ppi))
    in_section(bytes(past_end))
    in_section(bytes(bad_query))
    in_section(struct.pack("<II", R.PACKET_MSG, 0xFFFFFFF0) + bytes(40))  # msg_len past the section
    # GPA-direct: a page outside guest RAM, and a range list shorter than its count.
    outside = encode_gpa_direct_header([GpaRange(100, 0, (ram_pages + 5,))])
    cases.append((rndis_send(N.NO_SECTION, 0), PacketType.DATA_USING_GPA_DIRECT, outside))
    cases.append((rndis_send(N.NO_SECTION, 0), PacketType.DATA_USING_GPA_DIRECT, struct.pack("<II", 0, 40)))
    # NVSP: a second INIT, an unknown type, a truncated message, a second receive buffer.
    cases.append((N.message(N.INIT, N.Msg.INIT, N.V61, N.V61), PacketType.DATA_INBAND, b""))
    cases.append((struct.pack("<I", 9999).ljust(40, b"\0"), PacketType.DATA_INBAND, b""))
    cases.append((b"\x6b\0\0", PacketType.DATA_INBAND, b""))
    cases.append((N.message(N.BUFFER, N.Msg.SEND_RECEIVE_BUFFER, 0xDEAD, N.RECEIVE_BUFFER_ID),
                  PacketType.DATA_INBAND, b""))
    return cases


async def test_hostile_requests_are_refused_and_the_nic_goes_on() -> None:
    async with nic_on_switch() as (pair, peer):
        nic = pair.guest
        cases = hostile_requests(nic, pair.memory.pages)
        out, _ = pair.guest_rings
        for i, (payload, ptype, header) in enumerate(cases):
            out.write(payload, trans_id=BIG_TID | (0x8000 + i), completion_requested=True,
                      packet_type=ptype, header=header)
        out.write(b"", trans_id=0x7777, packet_type=PacketType.COMPLETION)  # names nothing we sent
        if out.commit():
            pair.host_doorbell.ring()
        with trio.fail_after(10):
            while nic.counters["tx_refused"] < len(cases):
                await trio.sleep(0.01)
        drops = pair.host.snapshot()["drops"]
        assert drops["bad_request"] == len(cases) - 2  # two malformed frames are dropped, not refused
        assert drops["bad_frame"] == 2 and drops["stray_completion"] == 1
        # A SET of an OID outside the allow-list, and a malformed packet filter.
        reply = await nic.rndis(R.set_request(0, 0xFFFFFFFF, b"\0" * 16))
        assert reply.status == R.STATUS_NOT_SUPPORTED
        reply = await nic.rndis(R.set_request(0, R.OID_GEN_CURRENT_PACKET_FILTER, b"\1\0"))
        assert reply.status == R.STATUS_INVALID_DATA
        # Still a working NIC, both ways.
        out_frame = frame(PEER_MAC, GUEST_MAC, os.urandom(200))
        await nic.send(out_frame)
        with trio.fail_after(10):
            assert await peer.receive() == [out_frame]
        in_frame = frame(GUEST_MAC, PEER_MAC, os.urandom(200))
        peer.switch.forward(peer, in_frame)
        with trio.fail_after(10):
            assert await nic.receive() == in_frame


async def test_a_guest_that_never_completes_holds_only_its_own_buffers() -> None:
    """Frames for a guest that stops completing fill its receive buffer and
    then wait in its own switch port (bounded, drops counted); another NIC
    on the same switch keeps receiving."""
    async with nic_on_switch() as (pair, peer), nic_on_switch() as (other, other_peer):
        pair.guest.channel.incoming.mask()  # (the reader stays asleep: nothing is completed)
        pair.guest.outbox.channel = other.guest_channel  # its completions go nowhere useful
        for _ in range(3000):
            peer.switch.forward(peer, frame(GUEST_MAC, PEER_MAC, bytes(100)))
        f = frame(bytes.fromhex("00155d000001"), PEER_MAC, b"other" * 20)
        other_peer.switch.forward(other_peer, f)
        with trio.fail_after(10):
            assert await other.guest.receive() == f
        state = pair.host.snapshot()
        assert state["session"]["receive_in_flight"] <= state["session"]["receive_sections"]


GUEST_HOSTILE = '''
import json, struct
import trio
from ring import PacketType
from vmbus.protocols import netvsc as N


async def junk(kernel, argv):
    nic = kernel.device("net")
    bad = [N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, 0, 99999, 10),
           N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, 0, 0, 1 << 30),
           N.message(N.INIT, N.Msg.INIT, 0x60001, 0x60001), b"\\xff" * 3]
    for payload in bad * 25:
        await nic.channel.send(payload, trans_id=0x1234, completion_requested=True)
    print(json.dumps({"sent": len(bad) * 25}), flush=True)
    await trio.sleep_forever()
'''


def test_a_hostile_guest_process_leaves_the_host_and_its_peer_working(tmp_path: Path) -> None:
    need_network_privileges()
    (tmp_path / "junkprog.py").write_text(GUEST_HOSTILE)
    with ExitStack() as stack:
        ns_a = stack.enter_context(netns("pvx"))
        ns_b = stack.enter_context(netns("pvy"))
        host = stack.enter_context(host_process(tmp_path, "--device", "net:backend=switch,switch=h"))
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
        from tests.bus.harness import PVBUS

        junk = subprocess.Popen([*PVBUS, "guest", "--socket", host.socket, "--ram", "64", "--program",
                                 "junkprog:junk", "--netns", ns_a, "--ip", "10.79.0.1/24"],
                                stdout=subprocess.PIPE, env=env)
        try:
            assert junk.stdout is not None
            assert json.loads(junk.stdout.readline())["sent"] == 100
            with guest(tmp_path, host, ns_b, "--ip", "10.79.0.2/24"):
                ping = in_ns(ns_b, "ping", "-c", "2", "-i", "0.2", "-W", "5", "10.79.0.1")
                assert ping.returncode == 0, ping.stdout + ping.stderr
                nics = {p["id"]: ch["device_state"] for p in host.inspect()["partitions"]
                        for ch in p["channels"] if ch["device"] == "net"}
                assert sorted(n["drops"].get("bad_request", 0) for n in nics.values()) == [0, 100]
        finally:
            junk.terminate()
            assert junk.wait(timeout=30) == 0


pytestmark = pytest.mark.timeout(120)
