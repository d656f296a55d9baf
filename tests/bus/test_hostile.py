"""A hostile guest: every malformed or out-of-order message gets an error
status (and where the protocol has a response, a failure response), is
counted, and the host keeps serving this guest and others."""

from __future__ import annotations

import struct
from pathlib import Path

import trio

from vmbus import hv
from vmbus import protocol as P
from vmbus.transport import KIND, ExitKind, recv_msg, send_msg

from .harness import RawGuest, host_process, run_guest

S = hv.HvStatus


async def _raw_guest_run(socket_path: str, body) -> RawGuest:  # noqa: ANN001
    g = RawGuest()
    async with trio.open_nursery() as nursery:
        await g.connect(socket_path, nursery)
        await body(g)
        nursery.cancel_scope.cancel()
    g.close()
    return g


def test_hostile_messages_get_error_statuses(tmp_path: Path) -> None:
    with host_process(tmp_path) as host:

        async def body(g: RawGuest) -> None:
            # before contact
            assert await g.post(P.RequestOffers(), 4) == S.INVALID_PARTITION_STATE
            # truncated, unknown, oversized-claim messages
            assert await g.post(b"\x0e\x00\x00\x00", 4) == S.INVALID_PARAMETER  # 4 bytes: no header
            assert await g.post(P.InitiateContact(0x50003).encode()[:20], 4) == S.INVALID_PARAMETER
            assert await g.post(struct.pack("<II", 99, 0), 4) == S.INVALID_PARAMETER
            await g.contact()
            # wrong connection id after 5.0 negotiation
            assert await g.post(P.RequestOffers(), 1) == S.INVALID_CONNECTION_ID
            assert await g.post(P.RequestOffers()) == S.SUCCESS
            offer = await g.expect(P.OfferChannel)
            await g.expect(P.AllOffersDelivered)
            relid = offer.child_relid
            assert await g.post(P.RequestOffers()) == S.INVALID_PARTITION_STATE  # second one
            # a host-to-guest message type posted by the guest
            assert await g.post(P.OpenChannelResult(relid, 0, 0)) == S.INVALID_PARAMETER
            # GPADL with a page outside guest RAM
            bad = P.gpadl_messages(relid, 7, [1, 2, 10**9], 3 * 4096)
            assert await g.post(bad[0]) == S.INVALID_PARAMETER
            created = await g.expect(P.GpadlCreated)
            assert (created.gpadl, created.creation_status) == (7, P.STATUS_UNSUCCESSFUL)
            # GPADL for an unknown relid
            assert await g.post(P.gpadl_messages(999, 8, [3], 4096)[0]) == S.INVALID_PARAMETER
            assert (await g.expect(P.GpadlCreated)).creation_status == P.STATUS_UNSUCCESSFUL
            # GPADL whose declared length disagrees with its byte count
            assert await g.post(P.GpadlHeader(relid, 9, 8 + 8 * 2, 1, 4096, 0, (3, 4))) == S.INVALID_PARAMETER
            await g.expect(P.GpadlCreated)
            # a good GPADL, then the same id again, then a body for no GPADL
            ring_pfn = g.ram.alloc(4)
            for m in P.gpadl_messages(relid, 10, list(range(ring_pfn, ring_pfn + 4)), 4 * 4096):
                assert await g.post(m) == S.SUCCESS
            assert (await g.expect(P.GpadlCreated)).creation_status == P.STATUS_SUCCESS
            assert await g.post(P.gpadl_messages(relid, 10, [5], 4096)[0]) == S.INVALID_PARAMETER
            assert await g.post(P.GpadlBody(0, 0x77, (5, 6))) == S.INVALID_PARAMETER
            # a body that runs past the declared length
            msgs = P.gpadl_messages(relid, 11, list(range(100, 130)), 30 * 4096)
            assert await g.post(msgs[0]) == S.SUCCESS
            assert await g.post(P.GpadlBody(0, 11, tuple(range(200, 228)))) == S.INVALID_PARAMETER
            assert (await g.expect(P.GpadlCreated)).creation_status == P.STATUS_UNSUCCESSFUL
            # open: unknown relid, unknown GPADL, bad split
            assert await g.post(P.OpenChannel(999, 1, 10, 0, 2)) == S.INVALID_PARAMETER
            assert (await g.expect(P.OpenChannelResult)).status == P.STATUS_UNSUCCESSFUL
            assert await g.post(P.OpenChannel(relid, 1, 0x1234, 0, 2)) == S.INVALID_PARAMETER
            await g.expect(P.OpenChannelResult)
            assert await g.post(P.OpenChannel(relid, 1, 10, 0, 3)) == S.INVALID_PARAMETER  # 3 + 1 pages
            await g.expect(P.OpenChannelResult)
            # a valid open, then opening the open channel again
            assert await g.post(P.OpenChannel(relid, 1, 10, 0, 2)) == S.SUCCESS
            assert (await g.expect(P.OpenChannelResult)).status == P.STATUS_SUCCESS
            assert await g.post(P.OpenChannel(relid, 1, 10, 0, 2)) == S.INVALID_PARAMETER
            assert (await g.expect(P.OpenChannelResult)).status == P.STATUS_UNSUCCESSFUL
            # teardown of a GPADL that does not exist
            assert await g.post(P.GpadlTeardown(relid, 0x4242)) == S.INVALID_PARAMETER
            # the ring GPADL of an open channel cannot be torn down
            assert await g.post(P.GpadlTeardown(relid, 10)) == S.INVALID_PARAMETER
            # event port for a connection id that is not an open channel
            status, fds = await g.hv.hypercall(hv.HvCall.CONNECT_EVENT_PORT, struct.pack("<I", 0xDEAD))
            assert status == S.INVALID_CONNECTION_ID and fds == []
            # unknown hypercall, bad MSR, SIMP outside RAM, garbage exit
            status, _ = await g.hv.hypercall(0x1234, b"")
            assert status == S.INVALID_HYPERCALL_CODE
            wrmsr = KIND.pack(ExitKind.WRMSR)
            assert (await g.hv._exit("wrmsr", wrmsr + struct.pack("<IQ", 0x1, 0)))[0] == S.INVALID_PARAMETER
            simp_beyond_ram = struct.pack("<IQ", hv.HV_X64_MSR_SIMP, (1 << 40) | 1)
            assert (await g.hv._exit("wrmsr", wrmsr + simp_beyond_ram))[0] == S.INVALID_PARAMETER
            assert (await g.hv._exit("junk", b"\xff\xff\xff\xff"))[0] == S.INVALID_HYPERCALL_INPUT
            block = hv.POST_MESSAGE_INPUT.pack(4, 0, 1, 241, bytes(240))
            status, _ = await g.hv.hypercall(hv.HvCall.POST_MESSAGE, block)
            assert status == S.INVALID_PARAMETER  # payload size beyond 240
            # close the channel, close it again
            assert await g.post(P.CloseChannel(relid)) == S.SUCCESS
            assert await g.post(P.CloseChannel(relid)) == S.INVALID_PARAMETER
            # relid release for a channel that was never rescinded
            assert await g.post(P.RelidReleased(relid)) == S.INVALID_PARAMETER
            # still serving: unload works
            assert await g.post(P.Unload()) == S.SUCCESS
            await g.expect(P.UnloadResponse)

        trio.run(_raw_guest_run, host.socket, body)
        # the host counted what it refused, and serves a well-behaved guest
        rc, out, err = run_guest(host, "echo-demo", "50")
        assert rc == 0, err


def test_gpadl_with_several_body_messages(tmp_path: Path) -> None:
    """100 pages: a header with 26 PFNs and 3 bodies of up to 28; the ring
    formed from it opens and carries traffic."""
    with host_process(tmp_path) as host:

        async def body(g: RawGuest) -> None:
            await g.contact()
            await g.post(P.RequestOffers())
            offer = await g.expect(P.OfferChannel)
            pfn = g.ram.alloc(100)
            msgs = P.gpadl_messages(offer.child_relid, 0xE1E10, list(range(pfn, pfn + 100)), 100 * 4096)
            assert [type(m).__name__ for m in msgs] == ["GpadlHeader"] + ["GpadlBody"] * 3
            for m in msgs[:-1]:
                assert await g.post(m) == S.SUCCESS
                assert not any(isinstance(x, P.GpadlCreated) for x in g.messages)  # not before the last
            assert await g.post(msgs[-1]) == S.SUCCESS
            assert (await g.expect(P.GpadlCreated)).creation_status == P.STATUS_SUCCESS
            snap = await _inspect(host.socket)
            assert snap["partitions"][0]["gpadls"] == 1

        trio.run(_raw_guest_run, host.socket, body)


async def _inspect(sock: str) -> dict:
    from vmbus.host import admin_request

    return await admin_request(sock, {"cmd": "inspect"})


def test_connect_must_come_first_with_sealed_ram(tmp_path: Path) -> None:
    import os
    import socket as pysocket

    with host_process(tmp_path) as host:

        async def attempts() -> list[int]:
            statuses = []
            # an unsealed memfd (the guest could shrink it under the host)
            fd = os.memfd_create("unsealed")
            os.ftruncate(fd, 1 << 20)
            ev = os.eventfd(0)
            s = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_SEQPACKET)
            await s.connect(host.socket)
            await send_msg(s, KIND.pack(ExitKind.CONNECT) + struct.pack("<Q", 1 << 20), [fd, ev])
            statuses.append(struct.unpack("<I", (await recv_msg(s))[0])[0])
            s.close()
            # a hypercall before CONNECT
            s = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_SEQPACKET)
            await s.connect(host.socket)
            await send_msg(s, KIND.pack(ExitKind.HYPERCALL) + bytes(8))
            statuses.append(struct.unpack("<I", (await recv_msg(s))[0])[0])
            s.close()
            os.close(fd)
            os.close(ev)
            return statuses

        assert trio.run(attempts) == [S.INVALID_PARAMETER, S.INVALID_PARAMETER]
        snap = host.settled()
        assert snap["rejected_connects"] == 2 and snap["partitions"] == []


def test_a_failing_device_ends_its_channel_not_the_host(tmp_path: Path) -> None:
    """A host driver that raises (a bug, or input it did not expect) loses its
    channel, rescinded; the guest's other devices and other guests go on."""
    from .harness import env_with, install_plugin

    source = '''
import uuid
from vmbus.device import DeviceSpec, GuestDriver, HostDevice
from vmbus.channel import Requestor

class Broken(HostDevice):
    async def serve(self, channel, memory):
        await channel.receive()
        raise KeyError("a bug in a device")

class Driver(GuestDriver):
    def __init__(self, channel):
        super().__init__(channel)
        self.requests = Requestor(channel)
    async def start(self, nursery):
        nursery.start_soon(self.requests.run)

SPEC = DeviceSpec("broken", uuid.UUID("9a1f3c2e-5b7d-4e6f-8a9b-0c1d2e3f4a5b"), Broken, Driver, ring_pages=2)
'''
    site = install_plugin(tmp_path, "broken", source)
    from vmbus.errors import ChannelRevoked

    with host_process(tmp_path, env=env_with(site)) as host:

        async def body(kernel) -> None:  # noqa: ANN001
            import pytest

            broken = kernel.device("broken")
            with pytest.raises(ChannelRevoked):
                with trio.fail_after(30):
                    await broken.requests.request(b"boom")
            assert await kernel.device("echo").echo(b"still here") == b"still here"

        from ..storage.helpers import run_guest as run_in_guest

        run_in_guest(host.socket, body, ram_mib=16)
        rc, out, err = run_guest(host, "echo-demo", "20", env=env_with(site))
        assert rc == 0, err
        assert host.settled()["partitions"] == []
