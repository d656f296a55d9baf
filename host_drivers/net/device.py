"""netvsp: the host half of the synthetic NIC.

One ``NetvspHost`` per guest partition.  Its backend (``backends``) is made
on the first open and kept until the partition goes, so a guest that
closes and reopens its NIC finds the same host interface.

Each open channel is a ``NicSession`` with three tasks:

- the guest reader (``serve``): NVSP bring-up in the order of reference
  4.1, the guest's RNDIS messages (from a send-buffer section or GPA-direct
  pages, copied out once before any check), frames to the backend, control
  requests answered through the receive buffer, and the guest's
  completions of our transfer-page packets, which free sub-allocations;
- ``receive_frames``: backend frames into free receive sub-allocations,
  one transfer-page packet per batch (its id the first sub-allocation),
  waiting for the guest to give sub-allocations back when none is free
  (the backend then queues or drops, never the device);
- the ``Outbox``: the one writer of the outgoing ring.

A hostile guest costs only its own NIC: every field is checked
(``vmbus.protocols.netvsc``/``rndis``), a request out of order or
malformed is answered with FAIL (or, for a malformed frame, dropped and
counted) and the session goes on; RNDIS SET takes an allow-list of OIDs
(CVE-2021-28476 was a SET of a host-internal OID).  Counters per NIC
(frames, bytes, drops by reason) are in ``snapshot`` for ``pvbus inspect``.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from typing import Any

import trio

from ring import PacketType
from vmbus.channel import Channel
from vmbus.device import DeviceCommandError, HostDevice
from vmbus.guest_memory import GuestMemory, GuestMemoryError
from vmbus.protocols import netvsc as N
from vmbus.protocols import rndis as R
from vmbus.protocols.tap import Outbox

from .backends import Switch, SwitchPort, TapBackend

log = logging.getLogger(__name__)
LINK_SPEED = 100_000_000  # OID_GEN_LINK_SPEED in 100 bit/s: 10 Gbit/s
MAX_GPA_RANGES = 32  # Linux's MAX_PAGE_BUFFER_COUNT
MAX_RNDIS_BYTES = 0x10000 + 4096  # one send: a 64 KiB frame and its headers
CONTROL_QUEUE = 64  # control replies waiting for a control sub-allocation
SUPPORTED_OIDS = (
    R.OID_GEN_SUPPORTED_LIST, R.OID_GEN_HARDWARE_STATUS, R.OID_GEN_MEDIA_SUPPORTED, R.OID_GEN_MEDIA_IN_USE,
    R.OID_GEN_MAXIMUM_LOOKAHEAD, R.OID_GEN_MAXIMUM_FRAME_SIZE, R.OID_GEN_LINK_SPEED,
    R.OID_GEN_CURRENT_PACKET_FILTER, R.OID_GEN_MAXIMUM_TOTAL_SIZE, R.OID_GEN_MEDIA_CONNECT_STATUS,
    R.OID_GEN_FRIENDLY_NAME, R.OID_802_3_PERMANENT_ADDRESS, R.OID_802_3_CURRENT_ADDRESS,
    R.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES,
)
# NDIS_OFFLOAD revision 1 (112 bytes) with nothing supported: the guest
# computes its own checksums and segments (reference 7.3).
NO_OFFLOADS = struct.pack("<BBH", 0xA7, 1, 112).ljust(112, b"\0")


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"MAC address {text!r}: give six hex bytes, 00:15:5d:01:02:03")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    return mac


def random_mac() -> bytes:
    return bytes([0x00, 0x15, 0x5D]) + os.urandom(3)  # Hyper-V's prefix (reference 7.2)


class Counters:
    def __init__(self) -> None:
        self.tx_frames = self.tx_bytes = self.rx_frames = self.rx_bytes = 0
        self.transfer_packets = 0  # host -> guest packets carrying frames
        self.drops: Counter[str] = Counter()

    def as_dict(self) -> dict[str, Any]:
        return {"tx": {"frames": self.tx_frames, "bytes": self.tx_bytes},
                "rx": {"frames": self.rx_frames, "bytes": self.rx_bytes, "packets": self.transfer_packets},
                "drops": dict(self.drops)}


class NetvspHost(HostDevice):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.backend_name = config.get("backend", "switch")
        if self.backend_name not in ("tap", "switch"):
            raise ValueError(f"net backend {self.backend_name!r}: tap or switch")
        self.mac = parse_mac(config["mac"]) if config.get("mac") else random_mac()
        mtu = int(config.get("mtu", 1500))
        if not N.FRAME_MTU_MIN <= mtu + 14 <= N.FRAME_MTU_MAX:
            raise ValueError(f"net mtu {mtu}: from {N.FRAME_MTU_MIN - 14} to {N.FRAME_MTU_MAX - 14}")
        self.frame_mtu = mtu + 14
        self.backend: TapBackend | SwitchPort | None = None
        self.counters = Counters()
        self.link_up = True
        self.session: NicSession | None = None

    def _backend(self) -> TapBackend | SwitchPort:
        if self.backend is None:
            if self.backend_name == "tap":
                self.backend = TapBackend(self.config.get("ifname") or f"pvtap{os.getpid() % 10000}",
                                          mtu=self.frame_mtu - 14, netns=self.config.get("netns"),
                                          address=self.config.get("address"))
            else:
                self.backend = Switch.named(self.config.get("switch") or "default").attach()
        return self.backend

    async def serve(self, channel: Channel, memory: GuestMemory) -> None:
        session = NicSession(self, channel, memory, self._backend())
        self.session = session
        try:
            await session.run()
        finally:
            session.release()
            if self.session is session:
                self.session = None

    async def admin(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command != "link" or args.get("state") not in ("up", "down"):
            raise DeviceCommandError("net takes the command link with state=up or state=down")
        self.link_up = args["state"] == "up"
        if self.session is not None:
            self.session.indicate_link()
        return {"link": args["state"]}

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mac": self.mac.hex(":"), "mtu": self.frame_mtu - 14, "link": self.link_up}
        out.update(self.counters.as_dict())
        if self.backend is not None:
            out.update(self.backend.describe())
            if isinstance(self.backend, SwitchPort) and self.backend.queue_drops:
                out["drops"]["switch_queue_full"] = self.backend.queue_drops
        if self.session is not None:
            out["session"] = self.session.describe()
        return out

    async def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


class Refusal(Exception):
    """A guest request we answer with FAIL (the words are logged at debug)."""


class NicSession:
    """One open channel of the NIC: NVSP state, buffers, sub-allocations."""

    def __init__(self, nic: NetvspHost, channel: Channel, memory: GuestMemory,
                 backend: TapBackend | SwitchPort) -> None:
        self.nic = nic
        self.channel = channel
        self.memory = memory
        self.backend = backend
        self.counters = nic.counters
        self.outbox = Outbox(channel)
        self.version: int | None = None
        self.ndis_version: int | None = None
        self.config_mtu: int | None = None
        self.rx: memoryview | None = None
        self.layout: N.ReceiveLayout | None = None
        self.tx: memoryview | None = None
        self.tx_sections = 0
        self.rndis_ready = False
        self.packet_filter = 0
        self.free_data: list[int] = []
        self.free_control: list[int] = []
        self.outstanding: dict[int, list[int]] = {}  # transfer-page packet id -> its sub-allocations
        self.control_queue: list[bytes] = []
        self.freed = trio.Event()

    def describe(self) -> dict[str, Any]:
        return {"nvsp_version": None if self.version is None else hex(self.version),
                "rndis_ready": self.rndis_ready, "packet_filter": self.packet_filter,
                "receive_sections": self.layout.count if self.layout else 0,
                "receive_in_flight": sum(map(len, self.outstanding.values())), "send_sections": self.tx_sections}

    def release(self) -> None:
        """The channel is gone: drop our views of guest RAM."""
        for view in (self.rx, self.tx):
            if view is not None:
                view.release()
        self.rx = self.tx = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.outbox.run)
            nursery.start_soon(self.receive_frames)
            while True:
                for pkt in await self.channel.receive():
                    self.on_packet(pkt.type, pkt.trans_id, pkt.completion_requested, pkt.header, pkt.payload)
                await self.outbox.room()

    # -- guest -> host --------------------------------------------------------

    def on_packet(self, ptype: int, tid: int, wants_completion: bool, header: bytes | memoryview,
                  payload: bytes | memoryview) -> None:
        if ptype == PacketType.COMPLETION:
            self.on_completion(tid)
            return
        reply: bytes | None
        try:
            if ptype == PacketType.DATA_USING_GPA_DIRECT:
                mtype, fields = N.parse(payload, self.version)
                if mtype != N.Msg.SEND_RNDIS_PACKET:
                    raise Refusal(f"{mtype.name} by GPA-direct")
                reply = self.on_rndis_packet(fields, bytes(header))
            elif ptype == PacketType.DATA_INBAND:
                reply = self.on_nvsp(payload)
            else:
                raise Refusal(f"packet type {ptype}")
        except (N.NvspError, R.RndisError, Refusal, GuestMemoryError) as exc:
            self.counters.drops["bad_request"] += 1
            log.debug("net: refused a guest request: %s", exc)
            reply = N.message(N.RNDIS_PACKET_COMPLETE, N.Msg.SEND_RNDIS_PACKET_COMPLETE, N.Status.FAIL)
        if wants_completion:
            self.outbox.put(reply if reply is not None else b"", tid, False, PacketType.COMPLETION)

    def on_nvsp(self, payload: bytes | memoryview) -> bytes | None:
        """One in-band NVSP message; returns the completion body (None: empty)."""
        mtype, fields = N.parse(payload, self.version)
        if mtype == N.Msg.INIT:
            return self.on_init(*fields)
        if self.version is None:
            raise Refusal(f"{mtype.name} before INIT")
        if mtype == N.Msg.SEND_NDIS_CONFIG:
            if self.config_mtu is not None:
                raise Refusal("second NDIS_CONFIG")
            mtu = fields[0]
            self.config_mtu = mtu if N.FRAME_MTU_MIN <= mtu <= N.FRAME_MTU_MAX else N.FRAME_MTU_MIN
            return None
        if mtype == N.Msg.SEND_NDIS_VERSION:
            if self.ndis_version is not None:
                raise Refusal("second NDIS_VERSION")
            self.ndis_version = fields[0] << 16 | fields[1]
            return None
        if mtype == N.Msg.SEND_RECEIVE_BUFFER:
            return self.on_receive_buffer(fields[0])
        if mtype == N.Msg.SEND_SEND_BUFFER:
            return self.on_send_buffer(fields[0])
        if mtype == N.Msg.REVOKE_RECEIVE_BUFFER:
            self.rndis_ready = False  # nothing more arrives; the views go with the session
            return None
        if mtype == N.Msg.REVOKE_SEND_BUFFER:
            self.tx_sections = 0
            return None
        if mtype == N.Msg.SEND_RNDIS_PACKET:
            return self.on_rndis_packet(fields, b"")
        raise Refusal(f"{mtype.name} from the guest")

    def on_init(self, min_version: int, max_version: int) -> bytes:
        if self.version is not None:
            raise Refusal("second INIT")
        if min_version in N.VERSIONS and min_version <= max(max_version, min_version):
            self.version = min_version
            return N.message(N.INIT_COMPLETE, N.Msg.INIT_COMPLETE, min_version, 34, N.Status.SUCCESS)
        return N.message(N.INIT_COMPLETE, N.Msg.INIT_COMPLETE, 0, 0, N.Status.NONE)

    def _buffer_view(self, handle: int) -> memoryview:
        if self.channel.gpadl is None:
            raise Refusal("this bus cannot reach buffer GPADLs")
        return self.memory.contiguous_pages(self.channel.gpadl(handle))

    def on_receive_buffer(self, handle: int) -> bytes:
        assert self.version is not None
        if self.rx is not None:
            raise Refusal("second receive buffer")
        if self.version >= N.V2 and self.config_mtu is None:
            raise Refusal("receive buffer before NDIS_CONFIG")
        view = self._buffer_view(handle)
        sub_alloc = N.receive_sub_alloc(self.nic.frame_mtu)
        count = min(len(view) // sub_alloc, 0xFFFF)
        if count < N.CONTROL_SECTIONS + 2:
            size = len(view)  # read before the release: a released view has no length
            view.release()
            raise Refusal(f"receive buffer of {size} bytes holds {count} sub-allocations")
        self.rx, self.layout = view, N.ReceiveLayout(sub_alloc, count)
        self.free_control = list(range(N.CONTROL_SECTIONS - 1, -1, -1))
        self.free_data = list(range(count - 1, N.CONTROL_SECTIONS - 1, -1))
        return self.layout.encode()

    def on_send_buffer(self, handle: int) -> bytes:
        if self.tx is not None:
            raise Refusal("second send buffer")
        if self.rx is None:
            raise Refusal("send buffer before the receive buffer")
        view = self._buffer_view(handle)
        self.tx, self.tx_sections = view, len(view) // N.SEND_SECTION_SIZE
        return N.message(N.SEND_BUFFER_COMPLETE, N.Msg.SEND_SEND_BUFFER_COMPLETE, N.Status.SUCCESS,
                         N.SEND_SECTION_SIZE)

    def _gpa_bytes(self, header: bytes) -> bytes:
        """The bytes a GPA-direct packet's ranges name, copied once, in order."""
        out = bytearray()
        for count, offset, pfns in N.parse_gpa_ranges(header, MAX_GPA_RANGES):
            if len(out) + count > MAX_RNDIS_BYTES:
                raise Refusal(f"GPA-direct ranges of more than {MAX_RNDIS_BYTES} bytes")
            for view in self.memory.iovec(pfns, offset, count):
                out += view
        return bytes(out)

    def on_rndis_packet(self, fields: tuple[int, ...], header: bytes) -> bytes:
        channel_type, index, size = fields
        if self.ndis_version is None or self.rx is None:
            raise Refusal("RNDIS before the NDIS version and the receive buffer")
        if index != N.NO_SECTION:
            if self.tx is None or index >= self.tx_sections or not 0 < size <= N.SEND_SECTION_SIZE:
                raise Refusal(f"send section {index} of {size} bytes (have {self.tx_sections})")
            start = index * N.SEND_SECTION_SIZE
            data = bytes(self.tx[start : start + size])  # copied once: the guest may rewrite it
        elif header:
            data = self._gpa_bytes(header)
        else:
            raise Refusal("SEND_RNDIS_PACKET naming neither a section nor pages")
        messages = R.split_messages(data)
        if messages and messages[0][0] == R.PACKET_MSG:
            return self.on_frames(messages)
        for _, msg in messages:
            self.on_control(R.parse_request(msg))
        return N.message(N.RNDIS_PACKET_COMPLETE, N.Msg.SEND_RNDIS_PACKET_COMPLETE, N.Status.SUCCESS)

    def on_frames(self, messages: list[tuple[int, memoryview]]) -> bytes:
        frames: list[memoryview] = []
        bad = 0
        for mtype, msg in messages:
            try:
                if mtype != R.PACKET_MSG:
                    raise R.RndisError("a control message after a data message")
                frame, _info = R.parse_packet(msg, self.nic.frame_mtu)
                frames.append(frame)
            except R.RndisError as exc:
                bad += 1
                log.debug("net: bad frame from the guest: %s", exc)
        c = self.counters
        if bad:
            c.drops["bad_frame"] += bad
        if frames:
            sent, drops = self.backend.transmit(frames)
            c.drops.update(drops)
            c.tx_frames += len(frames) - sum(drops.values())
            c.tx_bytes += sent
        status = N.Status.FAIL if bad else N.Status.SUCCESS
        return N.message(N.RNDIS_PACKET_COMPLETE, N.Msg.SEND_RNDIS_PACKET_COMPLETE, status)

    def on_completion(self, tid: int) -> None:
        sections = self.outstanding.pop(tid, None)
        if sections is None:
            self.counters.drops["stray_completion"] += 1
            return
        for s in sections:
            (self.free_control if s < N.CONTROL_SECTIONS else self.free_data).append(s)
        if self.control_queue and self.free_control:
            queued, self.control_queue = self.control_queue, []
            for msg in queued:
                self.send_control(msg)
        self.freed.set()

    # -- RNDIS control --------------------------------------------------------

    def on_control(self, req: R.Request) -> None:
        if req.mtype == R.INITIALIZE_MSG:
            status = R.STATUS_SUCCESS
            self.rndis_ready = True
            self.send_control(R.initialize_complete(req.req_id, status, 0x4000))
            if not self.nic.link_up:
                self.send_control(R.indicate_status(R.STATUS_MEDIA_DISCONNECT))
        elif req.mtype == R.QUERY_MSG:
            data = self.query(req.oid)
            status = R.STATUS_NOT_SUPPORTED if data is None else R.STATUS_SUCCESS
            self.send_control(R.query_complete(req.req_id, status, data or b""))
        elif req.mtype == R.SET_MSG:
            self.send_control(R.set_complete(req.req_id, self.set(req.oid, req.data)))
        elif req.mtype == R.KEEPALIVE_MSG:
            self.send_control(R.keepalive_complete(req.req_id, R.STATUS_SUCCESS))
        elif req.mtype == R.HALT_MSG:
            self.rndis_ready = False  # never answered (reference 7.1)

    def query(self, oid: int) -> bytes | None:
        nic = self.nic
        u32 = struct.Struct("<I").pack
        answers: dict[int, bytes] = {
            R.OID_GEN_SUPPORTED_LIST: struct.pack(f"<{len(SUPPORTED_OIDS)}I", *SUPPORTED_OIDS),
            R.OID_GEN_HARDWARE_STATUS: u32(0), R.OID_GEN_MEDIA_SUPPORTED: u32(0), R.OID_GEN_MEDIA_IN_USE: u32(0),
            R.OID_GEN_MAXIMUM_LOOKAHEAD: u32(nic.frame_mtu - 14), R.OID_GEN_MAXIMUM_FRAME_SIZE: u32(nic.frame_mtu - 14),
            R.OID_GEN_MAXIMUM_TOTAL_SIZE: u32(nic.frame_mtu), R.OID_GEN_LINK_SPEED: u32(LINK_SPEED),
            R.OID_GEN_CURRENT_PACKET_FILTER: u32(self.packet_filter),
            R.OID_GEN_MEDIA_CONNECT_STATUS: u32(R.MEDIA_CONNECTED if nic.link_up else R.MEDIA_DISCONNECTED),
            R.OID_GEN_FRIENDLY_NAME: "pvbus network adapter".encode("utf-16-le") + b"\0\0",
            R.OID_802_3_PERMANENT_ADDRESS: nic.mac, R.OID_802_3_CURRENT_ADDRESS: nic.mac,
            R.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES: NO_OFFLOADS,
        }
        return answers.get(oid)

    def set(self, oid: int, data: bytes) -> int:
        """An allow-list (CVE-2021-28476): everything else is NOT_SUPPORTED."""
        if oid == R.OID_GEN_CURRENT_PACKET_FILTER:
            if len(data) != 4:
                return R.STATUS_INVALID_DATA
            (value,) = struct.unpack("<I", data)
            if value & ~R.PACKET_FILTER_KNOWN:
                return R.STATUS_INVALID_DATA
            self.packet_filter = value
            return R.STATUS_SUCCESS
        if oid == R.OID_TCP_OFFLOAD_PARAMETERS:
            # NDIS_OFFLOAD_PARAMETERS: header type 0x80, revision >= 1, size 20..sent.
            if len(data) < 20 or data[0] != 0x80 or data[1] < 1:
                return R.STATUS_INVALID_DATA
            if not 20 <= struct.unpack_from("<H", data, 2)[0] <= len(data):
                return R.STATUS_INVALID_DATA
            return R.STATUS_SUCCESS  # nothing to turn on: no offload is offered
        if oid == R.OID_GEN_NETWORK_LAYER_ADDRESSES:
            return R.STATUS_SUCCESS
        return R.STATUS_NOT_SUPPORTED

    def send_control(self, msg: bytes) -> None:
        """One control reply or indication in a control sub-allocation of
        its own, or queued until one is free (a bounded queue: a guest that
        never completes loses replies, counted)."""
        assert self.rx is not None and self.layout is not None
        if len(msg) > self.layout.usable:
            self.counters.drops["control_too_big"] += 1
            return
        if not self.free_control:
            if len(self.control_queue) >= CONTROL_QUEUE:
                self.counters.drops["control_queue_full"] += 1
            else:
                self.control_queue.append(msg)
            return
        section = self.free_control.pop()
        offset = section * self.layout.sub_alloc
        self.rx[offset : offset + len(msg)] = msg
        self.outstanding[section] = [section]
        self.outbox.put(N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, N.CHANNEL_CONTROL, N.NO_SECTION, 0),
                        section, True, PacketType.DATA_USING_XFER_PAGES, N.xfer_header([(len(msg), offset)]))

    def indicate_link(self) -> None:
        if self.rx is not None and self.rndis_ready:
            self.send_control(R.indicate_status(R.STATUS_MEDIA_CONNECT if self.nic.link_up
                                                else R.STATUS_MEDIA_DISCONNECT))

    # -- backend -> guest ------------------------------------------------------

    def accepts(self, frame: bytes) -> bool:
        f = self.packet_filter
        if f & R.PACKET_FILTER_PROMISCUOUS:
            return True
        dst = frame[0:6]
        if dst == b"\xff" * 6:
            return bool(f & R.PACKET_FILTER_BROADCAST)
        if dst[0] & 1:
            return bool(f & (R.PACKET_FILTER_ALL_MULTICAST | R.PACKET_FILTER_MULTICAST))
        return bool(f & R.PACKET_FILTER_DIRECTED) and dst == self.nic.mac

    async def receive_frames(self) -> None:
        c = self.counters
        while True:
            frames = await self.backend.receive()
            if not (self.rndis_ready and self.nic.link_up and self.layout is not None):
                c.drops["nic_not_ready" if self.nic.link_up else "link_down"] += len(frames)
                continue
            room = min(self.layout.usable - R.PACKET_HEADER_LEN, self.nic.frame_mtu)
            wanted = []
            for frame in frames:
                if len(frame) < R.MIN_FRAME or len(frame) > room:
                    c.drops["rx_bad_size"] += 1
                elif not self.accepts(frame):
                    c.drops["filtered"] += 1
                else:
                    wanted.append(frame)
            while wanted:
                while not self.free_data:
                    self.freed = trio.Event()
                    await self.freed.wait()  # the guest gives sub-allocations back with its completions
                if self.rx is None or self.layout is None:
                    c.drops["nic_not_ready"] += len(wanted)
                    break
                take = min(len(wanted), len(self.free_data), N.MAX_RANGES)
                batch, wanted = wanted[:take], wanted[take:]
                self.deliver(batch)

    def deliver(self, frames: list[bytes]) -> None:
        """Frames into free sub-allocations, announced by one transfer-page packet."""
        assert self.rx is not None and self.layout is not None
        rx, size = self.rx, self.layout.sub_alloc
        sections = [self.free_data.pop() for _ in frames]
        ranges = []
        for section, frame in zip(sections, frames, strict=True):
            offset = section * size
            head = R.packet_header(len(frame))
            end = offset + len(head)
            rx[offset:end] = head
            rx[end : end + len(frame)] = frame
            ranges.append((len(head) + len(frame), offset))
        tid = sections[0]
        self.outstanding[tid] = sections
        c = self.counters
        c.rx_frames += len(frames)
        c.rx_bytes += sum(map(len, frames))
        c.transfer_packets += 1
        self.outbox.put(N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, N.CHANNEL_DATA, N.NO_SECTION, 0),
                        tid, True, PacketType.DATA_USING_XFER_PAGES, N.xfer_header(ranges))
