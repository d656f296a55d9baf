"""netvsc: the guest half of the synthetic NIC, ``kernel.device("net")``.

Bring-up follows Linux (reference 4.1-4.2): NVSP INIT newest version
first, NDIS config and version, a receive buffer and a send buffer each
described to the host by a GPADL of its own (``Channel.create_gpadl``),
then RNDIS INITIALIZE, the queries a guest needs (frame size, MAC, link)
and the packet filter.

Frames in: the host fills sub-allocations of the receive buffer and
announces them with a transfer-page packet; the reader checks every range
against the buffer, copies each message out once, hands frames on and
completes the packet through the ``Outbox`` (it never waits for ring room
itself).  Control replies arrive the same way and are matched by RNDIS
request id; an INDICATE_STATUS turns the carrier on or off.

Frames out: up to the host's per-message count, RNDIS PACKET messages
(8-byte aligned) are copied into one free send-buffer section and sent as
one in-band SEND_RNDIS_PACKET naming it; a frame too large for a section
(jumbo) goes GPA-direct from a page slot of its own.  A section or slot is
free again when the host's completion names it (transaction ids with
``DATA_TID`` set; the NVSP requests use the ``Requestor``'s small ids).

Where the frames go: ``present()`` makes the NIC a TAP interface (``eth0``
by default) in a named network namespace (``pvbus-guest-<pid>`` unless
given; created when missing, deleted at exit if we created it; real
programs run there with ``ip netns exec``), with the host's MAC and MTU,
and optionally an address and a default route, all through netlink
(pyroute2).  Without it, programs use ``send(frame)`` / ``receive()``.
When the host rescinds the NIC, the interface is set down (carrier off,
administratively down) and every waiter fails with ``ChannelRevoked``.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import struct
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import trio

from ring import GpaRange, PacketType, encode_gpa_direct_header
from vmbus.channel import Channel, Requestor
from vmbus.device import GuestDriver
from vmbus.errors import ChannelClosed, ChannelRevoked
from vmbus.protocols import netvsc as N
from vmbus.protocols import rndis as R
from vmbus.protocols.tap import Outbox, open_tap, read_frames

log = logging.getLogger(__name__)
PAGE = 4096
RECEIVE_BUFFER_BYTES = 4 << 20
SEND_BUFFER_BYTES = 1 << 20
BIG_SLOTS = 16  # GPA-direct slots for frames larger than a send section
BIG_SLOT_PAGES = 4
DATA_TID = 1 << 32  # transaction ids of data sends: DATA_TID | slot
BIG_TID = 1 << 33
RAW_QUEUE = 1024
TIMEOUT = 10.0
TUNSETCARRIER = 0x400454E2


class NetError(Exception):
    """The host refused the NIC's bring-up (the words say which step)."""


class NetvscDriver(GuestDriver):
    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.requests = Requestor(channel)
        self.outbox = Outbox(channel)
        self.version = 0
        self.mac = b""
        self.mtu = 0
        self.link_up = False
        self.link_changed = trio.Event()
        self.counters: Counter[str] = Counter()
        self._nursery: Any = None
        self._rx_pfn = self._tx_pfn = self._big_pfn = -1
        self._rx: memoryview | None = None
        self._tx: memoryview | None = None
        self._big: memoryview | None = None
        self._gpadls: list[int] = []
        self.layout: N.ReceiveLayout | None = None
        self.section_size = 0
        self._free_sections: list[int] = []
        self._free_big: list[int] = list(range(BIG_SLOTS))
        self._freed = trio.Event()
        self.max_packets = 1
        self.alignment = 8
        self._req_ids = iter(range(1, 1 << 31))
        self._replies: dict[int, tuple[trio.Event, list[R.Reply]]] = {}
        self._raw: deque[bytes] = deque()
        self._raw_ready = trio.Event()
        self.tap_fd = -1
        self.ifname: str | None = None
        self.netns: str | None = None

    # -- bring-up ------------------------------------------------------------

    async def start(self, nursery: Any) -> None:
        self._nursery = nursery
        nursery.start_soon(self._read)
        nursery.start_soon(self.outbox.run)
        with trio.fail_after(TIMEOUT):
            await self._bring_up()

    async def _nvsp(self, fmt: struct.Struct, *fields: int) -> bytes:
        pkt = await self.requests.request(N.message(fmt, *fields))
        return bytes(pkt.payload)

    async def _bring_up(self) -> None:
        for version in N.VERSIONS:
            reply = await self._nvsp(N.INIT, N.Msg.INIT, version, version)
            if len(reply) >= N.INIT_COMPLETE.size and N.INIT_COMPLETE.unpack_from(reply)[3] == N.Status.SUCCESS:
                self.version = version
                break
        else:
            raise NetError("the host accepts none of our NVSP versions")
        if self.version >= N.V2:
            await self.channel.send(N.message(N.NDIS_CONFIG, N.Msg.SEND_NDIS_CONFIG, N.FRAME_MTU_MAX, 0, 1 << 3))
        ndis = N.NDIS_6_30 if self.version > N.V4 else N.NDIS_6_1
        await self.channel.send(N.message(N.NDIS_VERSION, N.Msg.SEND_NDIS_VERSION, ndis >> 16, ndis & 0xFFFF))
        self._rx_pfn, self._rx, rx_handle = await self._buffer(RECEIVE_BUFFER_BYTES)
        reply = await self._nvsp(N.BUFFER, N.Msg.SEND_RECEIVE_BUFFER, rx_handle, N.RECEIVE_BUFFER_ID)
        self.layout = N.parse_receive_layout(reply, RECEIVE_BUFFER_BYTES)
        self._tx_pfn, self._tx, tx_handle = await self._buffer(SEND_BUFFER_BYTES)
        reply = await self._nvsp(N.BUFFER, N.Msg.SEND_SEND_BUFFER, tx_handle, N.SEND_BUFFER_ID)
        _, status, size = N.SEND_BUFFER_COMPLETE.unpack_from(reply.ljust(N.SEND_BUFFER_COMPLETE.size, b"\0"))
        if status != N.Status.SUCCESS or not 68 <= size <= SEND_BUFFER_BYTES or size % 4:
            raise NetError(f"send buffer refused (status {status}, sections of {size} bytes)")
        self.section_size = size
        self._free_sections = list(range(SEND_BUFFER_BYTES // size - 1, -1, -1))
        self._big_pfn = self.ram.alloc(BIG_SLOTS * BIG_SLOT_PAGES)
        self._big = self.ram.pages_view(self._big_pfn, BIG_SLOTS * BIG_SLOT_PAGES)
        init = await self.rndis(R.initialize(0, 0x4000))
        if init.status != R.STATUS_SUCCESS:
            raise NetError(f"RNDIS INITIALIZE refused ({init.status:#x})")
        self.max_packets = max(1, min(init.max_packets, 64))
        self.alignment = 1 << min(max(init.alignment_shift, 2), 12)
        self.mtu = struct.unpack("<I", (await self.query(R.OID_GEN_MAXIMUM_FRAME_SIZE))[:4])[0]
        self.mac = (await self.query(R.OID_802_3_PERMANENT_ADDRESS))[:6]
        connected = struct.unpack("<I", (await self.query(R.OID_GEN_MEDIA_CONNECT_STATUS))[:4])[0]
        if len(self.mac) != 6 or not 68 <= self.mtu <= N.FRAME_MTU_MAX - 14:
            raise NetError(f"host gave MAC {self.mac.hex(':')} and MTU {self.mtu}")
        self._set_link(connected == R.MEDIA_CONNECTED)
        await self.set_packet_filter(R.PACKET_FILTER_DIRECTED | R.PACKET_FILTER_ALL_MULTICAST
                                     | R.PACKET_FILTER_BROADCAST)
        log.info("net: NVSP %#x, MAC %s, MTU %d, link %s", self.version, self.mac.hex(":"), self.mtu,
                 "up" if self.link_up else "down")

    async def _buffer(self, size: int) -> tuple[int, memoryview, int]:
        """Guest pages for a buffer and the GPADL that hands them to the host."""
        assert self.channel.create_gpadl is not None, "this bus cannot describe buffers to the host"
        pages = size // PAGE
        pfn = self.ram.alloc(pages)
        handle = await self.channel.create_gpadl(list(range(pfn, pfn + pages)))
        self._gpadls.append(handle)
        return pfn, self.ram.pages_view(pfn, pages), handle

    # -- RNDIS control -------------------------------------------------------

    async def rndis(self, message: bytes) -> R.Reply:
        """Send one control message (its request id at byte 8 is set here)
        and wait for the reply with the same id."""
        req_id = next(self._req_ids)
        msg = bytearray(message)
        struct.pack_into("<I", msg, 8, req_id)
        slot: tuple[trio.Event, list[R.Reply]] = (trio.Event(), [])
        self._replies[req_id] = slot
        try:
            await self._send_messages([bytes(msg)], N.CHANNEL_CONTROL)
            with trio.fail_after(TIMEOUT):
                await slot[0].wait()
        finally:
            self._replies.pop(req_id, None)
        if not slot[1]:
            raise self.channel.revoked_error()
        return slot[1][0]

    async def query(self, oid: int) -> bytes:
        reply = await self.rndis(R.query(0, oid))
        if reply.status != R.STATUS_SUCCESS:
            raise NetError(f"query of OID {oid:#x} refused ({reply.status:#x})")
        return reply.data

    async def set_packet_filter(self, value: int) -> None:
        reply = await self.rndis(R.set_request(0, R.OID_GEN_CURRENT_PACKET_FILTER, struct.pack("<I", value)))
        if reply.status != R.STATUS_SUCCESS:
            raise NetError(f"packet filter {value:#x} refused ({reply.status:#x})")

    # -- the reader -----------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                for pkt in await self.channel.receive():
                    if pkt.type == PacketType.COMPLETION:
                        self._on_completion(pkt)
                    elif pkt.type == PacketType.DATA_USING_XFER_PAGES:
                        self._on_transfer(pkt.trans_id, pkt.header)
                    else:
                        self.counters["unexpected_packets"] += 1
                await self.outbox.room()
        except (ChannelRevoked, ChannelClosed):
            self._fail_waiters()

    def _on_completion(self, pkt: Any) -> None:
        tid = pkt.trans_id
        if tid & DATA_TID:
            if (tid & 0xFFFF) < len(self._tx or b"") // max(self.section_size, 1):
                self._free_sections.append(tid & 0xFFFF)
        elif tid & BIG_TID:
            if (tid & 0xFFFF) < BIG_SLOTS:
                self._free_big.append(tid & 0xFFFF)
        else:
            self.requests.deliver(pkt)
            return
        payload = bytes(pkt.payload)
        if len(payload) >= 8 and N.RNDIS_PACKET_COMPLETE.unpack_from(payload)[1] != N.Status.SUCCESS:
            self.counters["tx_refused"] += 1
        self._freed.set()

    def _on_transfer(self, tid: int, header: bytes | memoryview) -> None:
        rx, layout = self._rx, self.layout
        try:
            ranges = N.parse_xfer_header(header)
        except N.NvspError as exc:
            self.counters["bad_transfer"] += 1
            log.debug("net: %s", exc)
            ranges = []
        for count, offset in ranges:
            if rx is None or layout is None or count > layout.sub_alloc or offset > len(rx) - count:
                self.counters["bad_range"] += 1
                continue
            msg = memoryview(bytes(rx[offset : offset + count]))  # copied once: the host may rewrite it
            try:
                mtype, _ = R.message_type(msg)
                if mtype == R.PACKET_MSG:
                    frame, _info = R.parse_packet(msg, self.mtu + 14 if self.mtu else N.FRAME_MTU_MAX)
                    self._on_frame(frame)
                else:
                    self._on_reply(R.parse_reply(msg))
            except R.RndisError as exc:
                self.counters["bad_message"] += 1
                log.debug("net: %s", exc)
        self.outbox.put(N.message(N.RNDIS_PACKET_COMPLETE, N.Msg.SEND_RNDIS_PACKET_COMPLETE, N.Status.SUCCESS),
                        tid, False, PacketType.COMPLETION)

    def _on_reply(self, reply: R.Reply) -> None:
        if reply.mtype == R.INDICATE_STATUS_MSG:
            if reply.status in (R.STATUS_MEDIA_CONNECT, R.STATUS_MEDIA_DISCONNECT):
                self._set_link(reply.status == R.STATUS_MEDIA_CONNECT)
            return
        slot = self._replies.get(reply.req_id)
        if slot is None or slot[0].is_set():
            self.counters["stray_replies"] += 1
            return
        slot[1].append(reply)
        slot[0].set()

    def _on_frame(self, frame: memoryview) -> None:
        self.counters["rx_frames"] += 1
        if self.tap_fd >= 0:
            try:
                os.write(self.tap_fd, frame)
            except OSError:
                self.counters["rx_tap_drops"] += 1
            return
        if len(self._raw) >= RAW_QUEUE:
            self.counters["rx_raw_drops"] += 1
            return
        self._raw.append(bytes(frame))
        self._raw_ready.set()

    def _set_link(self, up: bool) -> None:
        self.link_up = up
        self.link_changed.set()
        self.link_changed = trio.Event()
        if self.tap_fd >= 0:
            fcntl.ioctl(self.tap_fd, TUNSETCARRIER, struct.pack("i", int(up)))

    def _fail_waiters(self) -> None:
        for event, _ in list(self._replies.values()):
            event.set()
        self._raw_ready.set()
        self._freed.set()
        self.link_changed.set()

    # -- sending ----------------------------------------------------------------

    async def _take(self, pool: list[int]) -> int:
        while not pool:
            self.channel.check()
            self._freed = trio.Event()
            await self._freed.wait()
        self.channel.check()
        return pool.pop()

    async def _send_messages(self, messages: list[bytes], channel_type: int) -> None:
        """Messages batched into send sections (``max_packets`` each, 8-byte
        aligned), one in-band SEND_RNDIS_PACKET per section."""
        assert self._tx is not None
        i = 0
        while i < len(messages):
            if len(messages[i]) > self.section_size:
                await self._send_big(messages[i], channel_type)
                i += 1
                continue
            section = await self._take(self._free_sections)
            base = section * self.section_size
            used = 0
            count = 0
            while i < len(messages) and count < self.max_packets:
                msg = messages[i]
                padded = -(-len(msg) // self.alignment) * self.alignment
                if used + padded > self.section_size:
                    break
                self._tx[base + used : base + used + len(msg)] = msg
                if padded != len(msg):  # msg_len counts the padding (reference 6.1)
                    struct.pack_into("<I", self._tx, base + used + 4, padded)
                    self._tx[base + used + len(msg) : base + used + padded] = bytes(padded - len(msg))
                used += padded
                count += 1
                i += 1
            self.outbox.put(N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, channel_type, section, used),
                            DATA_TID | section, True, PacketType.DATA_INBAND)

    async def _send_big(self, msg: bytes, channel_type: int) -> None:
        assert self._big is not None
        if len(msg) > BIG_SLOT_PAGES * PAGE:
            self.counters["tx_too_big"] += 1
            return
        slot = await self._take(self._free_big)
        base = slot * BIG_SLOT_PAGES * PAGE
        self._big[base : base + len(msg)] = msg
        first = self._big_pfn + slot * BIG_SLOT_PAGES
        pages = -(-len(msg) // PAGE)
        ranges = [GpaRange(len(msg), 0, tuple(range(first, first + pages)))]
        self.outbox.put(N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, channel_type, N.NO_SECTION, 0),
                        BIG_TID | slot, True, PacketType.DATA_USING_GPA_DIRECT, encode_gpa_direct_header(ranges))

    async def send_frames(self, frames: Sequence[bytes | memoryview]) -> None:
        """Frames out, batched into as few packets as the sections allow."""
        self.channel.check()
        good = []
        for frame in frames:
            if not R.MIN_FRAME <= len(frame) <= self.mtu + 14:
                self.counters["tx_bad_size"] += 1
                continue
            good.append(R.packet_header(len(frame)) + bytes(frame))
        self.counters["tx_frames"] += len(good)
        await self._send_messages(good, N.CHANNEL_DATA)

    async def send(self, frame: bytes) -> None:
        """One Ethernet frame (destination, source, type, payload; no FCS)."""
        if not R.MIN_FRAME <= len(frame) <= self.mtu + 14:
            raise ValueError(f"a frame of {len(frame)} bytes (this NIC takes {R.MIN_FRAME}..{self.mtu + 14})")
        await self.send_frames([frame])

    async def receive(self) -> bytes:
        """The next frame for us (when the NIC is not presented as a TAP)."""
        while not self._raw:
            self.channel.check()
            self._raw_ready = trio.Event()
            await self._raw_ready.wait()
        return self._raw.popleft()

    # -- presenting the NIC as a TAP interface -----------------------------------

    async def present(self, *, netns: str | None = None, ifname: str = "eth0", address: str | None = None,
                      gateway: str | None = None) -> str:
        """Make the NIC ``ifname`` in network namespace ``netns`` (created if
        missing); returns the namespace's name."""
        if self.tap_fd >= 0:
            raise RuntimeError(f"the NIC is already {self.ifname} in {self.netns}")
        name = netns or f"pvbus-guest-{os.getpid()}"
        fd, tmp = open_tap(f"pvnet{os.getpid() % 100000}")
        try:
            await trio.to_thread.run_sync(self._configure, tmp, name, ifname, address, gateway)
        except BaseException:
            os.close(fd)
            raise
        self.tap_fd, self.ifname, self.netns = fd, ifname, name
        self._set_link(self.link_up)
        self._nursery.start_soon(self._pump_tap)
        return name

    def _configure(self, tmp: str, name: str, ifname: str, address: str | None, gateway: str | None) -> None:
        from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

        if name not in netns.listnetns():
            netns.create(name)
            atexit.register(_remove_netns, name)
        with IPRoute() as ip:
            (index,) = ip.link_lookup(ifname=tmp)
            ip.link("set", index=index, address=self.mac.hex(":"), mtu=self.mtu, net_ns_fd=name)
        with IPRoute(netns=name) as ip:
            (index,) = ip.link_lookup(ifname=tmp)
            ip.link("set", index=index, ifname=ifname)
            ip.link("set", index=index, state="up")
            lo = ip.link_lookup(ifname="lo")
            if lo:
                ip.link("set", index=lo[0], state="up")
            if address:
                addr, _, prefix = address.partition("/")
                ip.addr("add", index=index, address=addr, prefixlen=int(prefix or 24))
            if gateway:
                ip.route("add", dst="default", gateway=gateway)

    async def _pump_tap(self) -> None:
        """Frames the guest's stack sends on the interface, to the host."""
        fd = self.tap_fd
        try:
            while True:
                frames = read_frames(fd, 64, self.mtu + 14 + 64)
                if frames:
                    await self.send_frames(frames)
                else:
                    await trio.lowlevel.wait_readable(fd)
        except (ChannelRevoked, ChannelClosed, OSError, trio.ClosedResourceError):
            return  # the NIC went away, or stop() closed the interface

    def statistics(self) -> dict[str, Any]:
        return {"mac": self.mac.hex(":"), "mtu": self.mtu, "link": self.link_up, "ifname": self.ifname,
                "netns": self.netns, **self.counters}

    # -- going away ---------------------------------------------------------------

    async def stop(self) -> None:
        """Rescind or shutdown: the interface goes down, waiters fail, and on
        a clean shutdown the buffers are withdrawn and the TAP closed."""
        self._fail_waiters()
        if self.tap_fd >= 0:
            self._set_link(False)
            try:
                await trio.to_thread.run_sync(self._set_down)
            except Exception as exc:  # noqa: BLE001 - the namespace may be gone already
                log.debug("net: setting %s down: %s", self.ifname, exc)
        self.requests.fail_all()
        if not self.channel.revoked and self.channel.teardown_gpadl is not None:
            for handle in self._gpadls:
                try:
                    await self.channel.teardown_gpadl(handle)
                except Exception as exc:  # noqa: BLE001 - a host stopping may refuse: it holds nothing then
                    log.debug("net: GPADL %#x teardown: %s", handle, exc)
            self._gpadls.clear()
            if self.tap_fd >= 0:
                trio.lowlevel.notify_closing(self.tap_fd)
                os.close(self.tap_fd)
                self.tap_fd = -1

    def _set_down(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute(netns=self.netns) as ip:
            found = ip.link_lookup(ifname=self.ifname)
            if found:
                ip.link("set", index=found[0], state="down")


def _remove_netns(name: str) -> None:
    from pyroute2 import netns

    try:
        netns.remove(name)
    except OSError:
        pass
