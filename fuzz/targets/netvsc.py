"""Network-device messages: NVSP (``vmbus.protocols.netvsc``) and RNDIS
(``vmbus.protocols.rndis``), at the parsers and at the host's session.

An input is a selector byte and then either one message for the parser
layer, or a sequence of guest packets for the host.  Parser layer: an
NVSP message at a fuzzed negotiated version (``netvsc.parse``), a
GPA-direct page-range header (``parse_gpa_ranges``), a send section of
batched RNDIS messages (``split_messages``, then each message through
``parse_request`` and, under PACKET_MSG, ``parse_packet`` as the host reads
them, and ``parse_reply`` as the guest does), a transfer-page header or a
receive-buffer answer (the guest's readers of the same layouts).

Host: up to 16 packets (structured NVSP messages whose fields favour the
values bring-up needs, raw bytes, completions of the host's transfer-page
packets) to ``NicSession.on_packet``, the host's own handler, with the
RNDIS bytes a SEND_RNDIS_PACKET names written first into the send section
or guest page it names.  The rig is cheap (well under a millisecond an
input): one module-level guest RAM, a ``Channel`` whose ``gpadl`` maps two
fixed handles to the receive and send buffers (any other handle is refused
as the bus refuses it), a port of a private switch as backend, and, where
the ``Outbox`` would publish on the ring, a recorder of what it is handed.
``vmbus.testing.open_device_pair`` is not used: it opens a whole bus per
input.

Invariants, parsers: only ``NvspError`` and ``RndisError`` escape; an
accepted NVSP message re-encodes to the payload's bytes; split messages
tile a prefix of the section, each with its own ``msg_len``; an accepted
frame, per-packet info, OID input or reply buffer is the message's bytes at
the offset it names and inside ``msg_len``, within the size caps; accepted
requests and packet headers in the encoder's layout re-encode to the bytes
they came from; page ranges and transfer ranges stay within their counts,
pages and header.  Host: ``on_packet`` raises nothing; every request asking
for a completion gets exactly one, in order, empty or a 40-byte NVSP
message; anything else the host sends is a control-reply announcement in
one range of a control sub-allocation holding a well-formed RNDIS reply of
exactly that length; guest RAM changes only in the receive buffer.
"""

from __future__ import annotations

import struct

import trio

from fuzz.rig import GuestRam, Input, Script, changed_ranges, check, inside
from host_drivers.net.backends import Switch
from host_drivers.net.device import NetvspHost, NicSession
from ring import IncomingRing, OutgoingRing, PacketType
from vmbus.channel import Channel
from vmbus.guest_memory import PAGE_SIZE, GuestMemoryError
from vmbus.protocols import netvsc as N
from vmbus.protocols import rndis as R

NVSP, GPA, RNDIS, XFER, LAYOUT, SESSION = range(6)
VERSIONS = (None, *N.VERSIONS)
FORMATS = {N.Msg.INIT: N.INIT, N.Msg.SEND_NDIS_VERSION: N.NDIS_VERSION, N.Msg.SEND_NDIS_CONFIG: N.NDIS_CONFIG,
           N.Msg.SEND_RECEIVE_BUFFER: N.BUFFER, N.Msg.SEND_SEND_BUFFER: N.BUFFER, N.Msg.REVOKE_RECEIVE_BUFFER: N.REVOKE,
           N.Msg.REVOKE_SEND_BUFFER: N.REVOKE, N.Msg.SEND_RNDIS_PACKET: N.RNDIS_PACKET,
           N.Msg.SEND_RNDIS_PACKET_COMPLETE: N.RNDIS_PACKET_COMPLETE}
MAX_FRAME = N.FRAME_MTU_MAX
GPA_MAX_RANGES = 32


def nvsp(payload: bytes, version: int | None) -> None:
    try:
        mtype, fields = N.parse(payload, version)
    except N.NvspError:
        return
    fmt = FORMATS[mtype]
    check(version is None or version >= N.SINCE.get(mtype, 0), f"{mtype.name} accepted at {version}")
    check(fmt.pack(mtype, *fields) == payload[: fmt.size], f"{mtype.name} {fields} does not re-encode")


def gpa_ranges(header: bytes) -> None:
    try:
        ranges = N.parse_gpa_ranges(header, GPA_MAX_RANGES)
    except N.NvspError:
        return
    _, count = N.GPA_HEADER.unpack_from(header)
    check(0 < len(ranges) == count <= GPA_MAX_RANGES, f"{len(ranges)} ranges of {count}")
    pos = N.GPA_HEADER.size
    for byte_count, offset, pfns in ranges:
        check(byte_count and offset < 4096 and len(pfns) * 4096 >= offset + byte_count, "range past its pages")
        check(N.XFER_RANGE.unpack_from(header, pos) == (byte_count, offset), "range is not the header's")
        pos += N.XFER_RANGE.size
        check(struct.pack(f"<{len(pfns)}Q", *pfns) == header[pos : pos + 8 * len(pfns)], "pages are not the header's")
        pos += 8 * len(pfns)
    check(pos <= len(header), "ranges past the header")


def inside_message(msg: memoryview, part: bytes, offset: int, length: int) -> None:
    check(8 + offset + len(part) <= length <= len(msg) and part == bytes(msg[8 + offset : 8 + offset + len(part)]),
          f"buffer at {offset}+{len(part)} is not the {length}-byte message's bytes")


def rndis_request(msg: memoryview) -> None:
    try:
        req = R.parse_request(msg)
    except R.RndisError:
        return
    mtype, length = R.HEADER.unpack_from(msg)
    raw = bytes(msg[:length])
    if mtype == R.INITIALIZE_MSG:
        minor = R.INITIALIZE.unpack_from(msg)[4]
        if length == R.INITIALIZE.size and minor == 0:
            check(R.initialize(req.req_id, req.max_transfer) == raw, "INITIALIZE does not re-encode")
    elif mtype in (R.QUERY_MSG, R.SET_MSG):
        _, _, _, _, buflen, bufoff, vc = R.REQUEST.unpack_from(msg)
        check(len(req.data) == buflen <= R.MAX_OID_INPUT, f"OID input of {len(req.data)} bytes, {buflen} named")
        if req.data:
            inside_message(msg, req.data, bufoff, length)
        if mtype == R.SET_MSG and req.data and bufoff == R.REQUEST.size - 8 and length == R.REQUEST.size + buflen \
                and not vc:
            check(R.set_request(req.req_id, req.oid, req.data) == raw, "SET does not re-encode")
    else:
        encode = R.keepalive if mtype == R.KEEPALIVE_MSG else R.halt
        if length == R.KEEPALIVE.size:
            check(encode(req.req_id) == raw, "KEEPALIVE/HALT does not re-encode")


def rndis_packet(msg: memoryview) -> None:
    try:
        frame, ppis = R.parse_packet(msg, MAX_FRAME)
    except R.RndisError:
        return
    fields = R.PACKET.unpack_from(msg)
    length, data_off, data_len, ppi_off, ppi_len = fields[1], fields[2], fields[3], fields[7], fields[8]
    check(R.MIN_FRAME <= len(frame) == data_len <= MAX_FRAME, f"frame of {len(frame)} bytes")
    inside_message(msg, bytes(frame), data_off, length)
    check(sum(len(p.payload) + R.PPI_HEADER.size for p in ppis) <= ppi_len <= R.MAX_PPI_BYTES, "per-packet info size")
    check(not ppis or 8 + ppi_off + ppi_len <= length, f"per-packet info at {ppi_off}+{ppi_len} past the message")
    # In the encoder's layout (no per-packet info, frame right after the header, reserved word zero):
    if not ppi_len and not ppi_off and data_off == R.PACKET_HEADER_LEN - 8 \
            and length == R.PACKET_HEADER_LEN + data_len and not fields[10]:
        check(R.packet_header(len(frame)) + bytes(frame) == bytes(msg), "PACKET_MSG does not re-encode")


def rndis_reply(msg: memoryview) -> None:
    try:
        reply = R.parse_reply(msg)
    except R.RndisError:
        return
    if reply.data:
        length = R.HEADER.unpack_from(msg)[1]
        bufoff = struct.unpack_from("<I", msg, 20 if reply.mtype == R.QUERY_CMPLT else 16)[0]
        check(len(reply.data) <= R.MAX_OID_INPUT, "reply buffer past its cap")
        inside_message(msg, reply.data, bufoff, length)


def rndis_section(section: bytes) -> None:
    try:
        messages = R.split_messages(section)
    except R.RndisError:
        return
    offset = 0
    for mtype, msg in messages:
        check(len(msg) >= R.HEADER.size and R.HEADER.unpack_from(msg) == (mtype, len(msg)), "message header")
        check(bytes(msg) == section[offset : offset + len(msg)], "messages do not tile the section")
        offset += len(msg)
        rndis_request(msg)
        if mtype == R.PACKET_MSG:  # the host parses a frame only under this type (``on_frames``)
            rndis_packet(msg)
        rndis_reply(msg)


def xfer(header: bytes) -> None:
    try:
        ranges = N.parse_xfer_header(header)
    except N.NvspError:
        return
    again = N.xfer_header(ranges)
    expected = header[:2] + bytes(2) + header[4 : len(again)]
    check(0 < len(ranges) <= N.MAX_RANGES and again == expected, "transfer-page header does not re-encode")


def layout(payload: bytes, buffer_size: int) -> None:
    try:
        got = N.parse_receive_layout(payload, buffer_size)
    except N.NvspError:
        return
    check(got.sub_alloc >= 68 and N.CONTROL_SECTIONS < got.count and got.sub_alloc * got.count <= buffer_size,
          f"accepted {got} for a {buffer_size}-byte buffer")


# -- the host's session: NicSession.on_packet on a rigged channel --------------------

RING = 2 * PAGE_SIZE  # each direction: control page and one data page (the session never writes them here)
RX_PFN, RX_PAGES = 4, 16  # the receive buffer GPADL: 36 sub-allocations of an MTU-1500 NIC
TX_PFN, TX_PAGES = RX_PFN + RX_PAGES, 4  # the send buffer GPADL: two 6144-byte sections
DATA_PFN, DATA_PAGES = TX_PFN + TX_PAGES, 8  # pages GPA-direct packets name
RX_HANDLE, TX_HANDLE = 1, 2
MAX_SESSION_PACKETS = 16
SPECIALS = (0, 1, 2, N.V61, N.V1, N.V5, 6, 30, 1514, 9216, N.NO_SECTION, 60, RX_HANDLE, TX_HANDLE, N.CHANNEL_CONTROL)
WIDTHS = {"I": 0xFFFFFFFF, "H": 0xFFFF, "Q": (1 << 64) - 1}
RAM = GuestRam(DATA_PFN + DATA_PAGES)
OutgoingRing(RAM.buf, RING, RING, format=True)
OutgoingRing(RAM.buf, 0, RING, format=True)


def gpadl(handle: int) -> list[int]:
    if handle == RX_HANDLE:
        return list(range(RX_PFN, RX_PFN + RX_PAGES))
    if handle == TX_HANDLE:
        return list(range(TX_PFN, TX_PFN + TX_PAGES))
    raise GuestMemoryError(f"no GPADL {handle:#x} for this device")  # what the bus says


async def never_woken() -> None:
    await trio.sleep_forever()


class Sent:
    """Stands where the session's ``Outbox`` is: records what it is handed
    instead of publishing it on the ring, with the receive buffer as it is
    at that moment (a freed sub-allocation is soon written again)."""

    def __init__(self) -> None:
        self.packets: list[tuple[bytes, int, bool, int, bytes]] = []
        self.receive_buffers: list[bytes] = []
        self.session: NicSession | None = None

    def put(self, payload: bytes, trans_id: int = 0, completion: bool = False, ptype: int = 6,
            header: bytes = b"") -> None:
        self.packets.append((bytes(payload), trans_id, completion, ptype, bytes(header)))
        rx = None if self.session is None else self.session.rx
        self.receive_buffers.append(b"" if rx is None else bytes(rx))


def field(inp: Input, width: int) -> int:
    pick = inp.u8()
    return (SPECIALS[pick % len(SPECIALS)] if pick < 0xC0 else inp.u32()) & width


def guest_packet(inp: Input) -> tuple[int, bool | int, bytes, bytes]:
    """(packet type, completion requested, GPA-direct header, payload), or
    for a completion (type, the id it completes, b"", payload); the RNDIS
    bytes a SEND_RNDIS_PACKET carries go to the section or page it names."""
    kind = inp.u8()
    ptype = (PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT, PacketType.COMPLETION,
             PacketType.DATA_USING_XFER_PAGES)[kind % 4] if kind < 0xF0 else inp.u16()
    if ptype == PacketType.COMPLETION:  # of a transfer-page packet: its id is a sub-allocation's
        return ptype, inp.u8(), b"", inp.blob(64)
    which = inp.u8()
    if which >= 0xE0:
        return ptype, not kind & 0x40, inp.blob(64), inp.blob(64)
    mtype = list(FORMATS)[which % len(FORMATS)]
    fmt = FORMATS[mtype]
    fields = [field(inp, WIDTHS[c]) for c in fmt.format[2:]]
    header = b""
    if mtype == N.Msg.SEND_RNDIS_PACKET:
        rndis = inp.blob(N.SEND_SECTION_SIZE)
        if ptype == PacketType.DATA_USING_GPA_DIRECT:
            fields[1] = N.NO_SECTION
            RAM.buf[DATA_PFN * PAGE_SIZE : DATA_PFN * PAGE_SIZE + len(rndis)] = rndis
            pages = (len(rndis) + PAGE_SIZE - 1) // PAGE_SIZE or 1
            header = N.GPA_HEADER.pack(0, 1) + N.XFER_RANGE.pack(len(rndis), 0) + struct.pack(
                f"<{pages}Q", *range(DATA_PFN, DATA_PFN + pages))
        elif fields[1] < TX_PAGES * PAGE_SIZE // N.SEND_SECTION_SIZE:
            start = TX_PFN * PAGE_SIZE + fields[1] * N.SEND_SECTION_SIZE
            RAM.buf[start : start + len(rndis)] = rndis
    return ptype, not kind & 0x40, header, N.message(fmt, mtype, *fields)


def check_sent(nic: NicSession, asked: list[int], sent: Sent) -> None:
    completions = [p for p in sent.packets if p[3] == PacketType.COMPLETION]
    check([p[1] for p in completions] == asked, f"completions {[p[1] for p in completions]} for requests {asked}")
    for payload, _, _, _, _ in completions:
        check(payload == b"" or (len(payload) == N.MESSAGE_SIZE and struct.unpack_from("<I", payload)[0] in set(N.Msg)),
              f"completion {payload.hex()}")
    announce = N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, N.CHANNEL_CONTROL, N.NO_SECTION, 0)
    for (payload, _, completion, ptype, header), rx in zip(sent.packets, sent.receive_buffers, strict=True):
        if ptype == PacketType.COMPLETION:
            continue
        check(ptype == PacketType.DATA_USING_XFER_PAGES and completion and payload == announce
              and nic.layout is not None, f"sent packet type {ptype}: {payload.hex()}")
        ranges = N.parse_xfer_header(header)
        check(len(ranges) == 1, f"a control reply in {len(ranges)} ranges")
        count, offset = ranges[0]
        check(offset % nic.layout.sub_alloc == 0 and offset // nic.layout.sub_alloc < N.CONTROL_SECTIONS
              and 0 < count <= nic.layout.usable, f"control reply at {offset}+{count}")
        reply = R.parse_reply(memoryview(rx[offset : offset + count]))
        check(R.HEADER.unpack_from(rx, offset)[1] == count, f"reply {reply} is not {count} bytes")


def session(inp: Input) -> None:
    port = Switch.named("fuzz").attach()
    nic = NetvspHost({"backend": "switch", "switch": "fuzz", "mac": "02:00:00:00:00:01"})
    view = RAM.memory.view(0, 2 * RING)
    channel = Channel(1, OutgoingRing(view, RING, RING), IncomingRing(view, 0, RING), lambda: None, never_woken)
    channel.gpadl = gpadl
    host = NicSession(nic, channel, RAM.memory, port)
    sent = Sent()
    sent.session = host
    host.outbox = sent  # type: ignore[assignment]
    try:
        packets = []
        while inp.left and len(packets) < MAX_SESSION_PACKETS:
            packets.append(guest_packet(inp))
        ram_before = bytes(RAM.ram.buf)
        asked = []
        for tid, (ptype, completion, header, payload) in enumerate(packets, 1):
            if ptype == PacketType.COMPLETION:
                host.on_packet(ptype, int(completion), False, header, payload)
                continue
            host.on_packet(ptype, tid, bool(completion), header, payload)
            if completion:
                asked.append(tid)
        rx_range = (RX_PFN * PAGE_SIZE, (RX_PFN + RX_PAGES) * PAGE_SIZE)
        changed = changed_ranges(ram_before, RAM.buf)
        check(inside(changed, [rx_range]), f"guest RAM written at {changed}, outside the receive buffer")
        check_sent(host, asked, sent)
    finally:
        host.release()
        port.close()
        view.release()


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    which = inp.u8() % 6
    if which == SESSION:
        session(inp)
    elif which == NVSP:
        version = VERSIONS[inp.u8() % len(VERSIONS)]
        nvsp(inp.take(len(data)), version)
    elif which == GPA:
        gpa_ranges(inp.take(len(data)))
    elif which == RNDIS:
        rndis_section(inp.take(len(data)))
    elif which == XFER:
        xfer(inp.take(len(data)))
    else:
        layout(inp.take(N.MESSAGE_SIZE), inp.u32())


def seeds() -> list[bytes]:
    """Bring-up as a guest sends it, a batched section of frames, the host's answers."""
    out = [Script().u8(NVSP).u8(0).raw(N.message(N.INIT, N.Msg.INIT, N.V61, N.V61)).data()]
    for version, msg in [
        (N.V61, N.message(N.NDIS_CONFIG, N.Msg.SEND_NDIS_CONFIG, 1514, 0, 0)),
        (N.V61, N.message(N.NDIS_VERSION, N.Msg.SEND_NDIS_VERSION, 6, 30)),
        (N.V61, N.message(N.BUFFER, N.Msg.SEND_RECEIVE_BUFFER, 3, N.RECEIVE_BUFFER_ID)),
        (N.V61, N.message(N.BUFFER, N.Msg.SEND_SEND_BUFFER, 4, N.SEND_BUFFER_ID)),
        (N.V61, N.message(N.RNDIS_PACKET, N.Msg.SEND_RNDIS_PACKET, N.CHANNEL_CONTROL, 0, 60)),
        (N.V1, N.message(N.NDIS_CONFIG, N.Msg.SEND_NDIS_CONFIG, 1514, 0, 0)),
        (N.V61, N.message(N.REVOKE, N.Msg.REVOKE_SEND_BUFFER, N.SEND_BUFFER_ID)),
    ]:
        out.append(Script().u8(NVSP).u8(VERSIONS.index(version)).raw(msg).data())
    frame = bytes(range(60))
    ppi = R.per_packet_info(0, struct.pack("<I", 0x12345678))
    frames = R.packet_header(len(frame)) + frame + R.packet_header(len(frame), ppi) + frame
    control = R.initialize(1) + R.query(2, R.OID_802_3_PERMANENT_ADDRESS) \
        + R.set_request(3, R.OID_GEN_CURRENT_PACKET_FILTER, struct.pack("<I", R.PACKET_FILTER_DIRECTED)) \
        + R.keepalive(4) + R.halt(5)
    replies = R.initialize_complete(1, R.STATUS_SUCCESS, 0x4000) + R.query_complete(2, 0, bytes(6)) \
        + R.set_complete(3, 0) + R.keepalive_complete(4, 0) + R.indicate_status(R.STATUS_MEDIA_CONNECT, bytes(4))
    for section in (frames, control, replies, frames + bytes(16)):
        out.append(Script().u8(RNDIS).raw(section).data())
    gpa = N.GPA_HEADER.pack(0, 2) + N.XFER_RANGE.pack(100, 4000) + struct.pack("<2Q", 7, 8) \
        + N.XFER_RANGE.pack(4096, 0) + struct.pack("<Q", 9)
    out.append(Script().u8(GPA).raw(gpa).data())
    out.append(Script().u8(XFER).raw(N.xfer_header([(60, 0), (100, 1808)])).data())
    receive = N.ReceiveLayout(N.receive_sub_alloc(1514), 64)
    out.append(Script().u8(LAYOUT).raw(receive.encode()).u32(receive.sub_alloc * receive.count).data())
    out.append(bring_up(control, frames))
    small = Script().u8(SESSION)  # a receive buffer too small for the sub-allocations: refused, not a crash
    guest_message(small, N.Msg.INIT, N.V61, N.V61)
    guest_message(small, N.Msg.SEND_NDIS_CONFIG, 1514, 0, 0)
    guest_message(small, N.Msg.SEND_RECEIVE_BUFFER, TX_HANDLE, N.RECEIVE_BUFFER_ID)
    out.append(small.data())
    return out


def guest_message(s: Script, mtype: N.Msg, *fields: int, gpa: bool = False) -> Script:
    """One structured packet, in the fields ``guest_packet`` reads (completion requested)."""
    s.u8(1 if gpa else 0).u8(list(FORMATS).index(mtype))
    for value in fields:
        s.u8(SPECIALS.index(value)) if value in SPECIALS else s.u8(0xC0).u32(value)
    return s


def bring_up(control: bytes, frames: bytes) -> bytes:
    """A guest's whole bring-up on the host's session: NVSP, both buffers,
    RNDIS control from a send section, frames by section and by pages, and
    its completion of the host's first control reply."""
    s = Script().u8(SESSION)
    guest_message(s, N.Msg.INIT, N.V61, N.V61)
    guest_message(s, N.Msg.SEND_NDIS_CONFIG, 1514, 0, 0)
    guest_message(s, N.Msg.SEND_NDIS_VERSION, 6, 30)
    guest_message(s, N.Msg.SEND_RECEIVE_BUFFER, RX_HANDLE, N.RECEIVE_BUFFER_ID)
    guest_message(s, N.Msg.SEND_SEND_BUFFER, TX_HANDLE, N.SEND_BUFFER_ID)
    guest_message(s, N.Msg.SEND_RNDIS_PACKET, N.CHANNEL_CONTROL, 0, len(control)).blob(control)
    guest_message(s, N.Msg.SEND_RNDIS_PACKET, N.CHANNEL_DATA, 1, len(frames)).blob(frames)
    guest_message(s, N.Msg.SEND_RNDIS_PACKET, N.CHANNEL_DATA, N.NO_SECTION, 0, gpa=True).blob(frames)
    s.u8(2).u8(0).u16(0)  # the guest completes the host's first control reply (sub-allocation 0)
    s.u8(2).u8(0).u16(0)  # twice: the second is a stray
    return s.data()
