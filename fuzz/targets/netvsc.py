"""Network-device messages: NVSP (``vmbus.protocols.netvsc``) and RNDIS
(``vmbus.protocols.rndis``), the parser layer.

An input is a selector byte and one message from the guest: an NVSP
message at a fuzzed negotiated version (``netvsc.parse``, what
``NicSession.on_packet`` reads first), a GPA-direct page-range header
(``parse_gpa_ranges``), or a send section of batched RNDIS messages
(``split_messages``, then each message through ``parse_request`` and
``parse_packet`` as the host reads them and ``parse_reply`` as the guest
does); and, for the guest's side of the same layouts, a transfer-page
header or a receive-buffer answer.  The parser layer only: the host's
``NicSession`` needs an open channel with two GPADLs and a backend per
input, which ``vmbus.testing.open_device_pair`` gives only through a
whole bus handshake, far from cheap at thousands of inputs a second.

Invariants: only ``NvspError`` and ``RndisError`` escape; an accepted NVSP
message re-encodes to the payload's bytes; split messages tile a prefix of
the section, each inside it with its own ``msg_len``; an accepted frame,
per-packet info, OID input or reply buffer is the message's bytes at the
offset it names and inside ``msg_len``, within the size caps; accepted
requests and packet headers in the encoder's layout re-encode to the
bytes they came from; page ranges and transfer ranges stay within their
counts, pages and header.
"""

from __future__ import annotations

import struct

from fuzz.rig import Input, Script, check
from vmbus.protocols import netvsc as N
from vmbus.protocols import rndis as R

NVSP, GPA, RNDIS, XFER, LAYOUT = range(5)
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


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    which = inp.u8() % 5
    if which == NVSP:
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
    return out
