"""RNDIS, the message set the synthetic NIC carries inside NVSP packets.

Byte layouts from docs/netvsc-reference sections 6.3 and 7 (Linux
``drivers/net/hyperv/rndis_filter.c``, DPDK ``drivers/net/netvsc/rndis.h``,
OpenVMM ``vm/devices/net/netvsp/src/rndisprot.rs``).  Every message starts
``u32 type, u32 msg_len``; every buffer offset in a message counts from
byte 8 (the request id, or the status of an indication).

Parsing is for bytes from the other side: each parser checks ``msg_len``
against the bytes present, every offset and length against ``msg_len``
(as Python integers: no wrap-around), and caps what it will copy, raising
``RndisError`` with one line for anything malformed.  Nothing here keeps
state; the host device and the guest driver own theirs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- message types -----------------------------------------------------------
PACKET_MSG = 0x1
INITIALIZE_MSG = 0x2
HALT_MSG = 0x3
QUERY_MSG = 0x4
SET_MSG = 0x5
RESET_MSG = 0x6
INDICATE_STATUS_MSG = 0x7
KEEPALIVE_MSG = 0x8
COMPLETION_BIT = 0x80000000
INITIALIZE_CMPLT = INITIALIZE_MSG | COMPLETION_BIT
QUERY_CMPLT = QUERY_MSG | COMPLETION_BIT
SET_CMPLT = SET_MSG | COMPLETION_BIT
RESET_CMPLT = RESET_MSG | COMPLETION_BIT
KEEPALIVE_CMPLT = KEEPALIVE_MSG | COMPLETION_BIT

# -- status values -------------------------------------------------------------
STATUS_SUCCESS = 0
STATUS_FAILURE = 0xC0000001
STATUS_NOT_SUPPORTED = 0xC00000BB
STATUS_INVALID_DATA = 0xC0010015
STATUS_MEDIA_CONNECT = 0x4001000B
STATUS_MEDIA_DISCONNECT = 0x4001000C
STATUS_LINK_SPEED_CHANGE = 0x40010013

# -- OIDs a guest uses at bring-up (reference 7.2) ------------------------------
OID_GEN_SUPPORTED_LIST = 0x00010101
OID_GEN_HARDWARE_STATUS = 0x00010102
OID_GEN_MEDIA_SUPPORTED = 0x00010103
OID_GEN_MEDIA_IN_USE = 0x00010104
OID_GEN_MAXIMUM_LOOKAHEAD = 0x00010105
OID_GEN_MAXIMUM_FRAME_SIZE = 0x00010106
OID_GEN_LINK_SPEED = 0x00010107
OID_GEN_CURRENT_PACKET_FILTER = 0x0001010E
OID_GEN_MAXIMUM_TOTAL_SIZE = 0x00010111
OID_GEN_MEDIA_CONNECT_STATUS = 0x00010114
OID_GEN_NETWORK_LAYER_ADDRESSES = 0x00010118
OID_GEN_FRIENDLY_NAME = 0x00020216
OID_802_3_PERMANENT_ADDRESS = 0x01010101
OID_802_3_CURRENT_ADDRESS = 0x01010102
OID_TCP_OFFLOAD_PARAMETERS = 0xFC01020C
OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01020D

PACKET_FILTER_DIRECTED = 0x1
PACKET_FILTER_MULTICAST = 0x2
PACKET_FILTER_ALL_MULTICAST = 0x4
PACKET_FILTER_BROADCAST = 0x8
PACKET_FILTER_PROMISCUOUS = 0x20
PACKET_FILTER_KNOWN = 0x3F  # every bit up to PROMISCUOUS
MEDIA_CONNECTED = 0  # GEN_MEDIA_CONNECT_STATUS: 0 = connected, 1 = disconnected
MEDIA_DISCONNECTED = 1

# -- layouts ------------------------------------------------------------------
HEADER = struct.Struct("<II")  # type, msg_len
INITIALIZE = struct.Struct("<IIIIII")  # type, len, req_id, major, minor, max_xfer_size
INITIALIZE_COMPLETE = struct.Struct("<IIIIIIIIIIIII")  # 52 bytes
REQUEST = struct.Struct("<IIIIIII")  # QUERY/SET: type, len, req_id, oid, buflen, bufoff, vc_handle
QUERY_COMPLETE = struct.Struct("<IIIIII")  # type, len, req_id, status, buflen, bufoff (16)
SET_COMPLETE = struct.Struct("<IIII")  # type, len, req_id, status
INDICATE_STATUS = struct.Struct("<IIIII")  # type, len, status, buflen, bufoff (12)
KEEPALIVE = struct.Struct("<III")  # also HALT: type, len, req_id
KEEPALIVE_COMPLETE = struct.Struct("<IIII")  # type, len, req_id, status
# PACKET_MSG after the header: data_offset, data_len, oob_offset, oob_len,
# num_oob, ppi_offset, ppi_len, vc_handle, reserved (offsets from byte 8)
PACKET = struct.Struct("<IIIIIIIIIII")
PACKET_HEADER_LEN = PACKET.size  # 44
PPI_HEADER = struct.Struct("<III")  # size, type (bit 31 internal), offset of the payload

MAX_OID_INPUT = 4096  # largest SET input copied (the guest says how much it sent)
MAX_PPI_BYTES = 256  # per-packet info beyond this is refused (Linux sends at most 64)
ETH_HEADER = 14
MIN_FRAME = ETH_HEADER  # an Ethernet header and nothing else is still a frame
PKT_ALIGNMENT_SHIFT = 3  # 8-byte alignment of batched PACKET_MSGs (OpenVMM)
MAX_PACKETS_PER_MESSAGE = 8


class RndisError(ValueError):
    """A malformed RNDIS message (the words say which field)."""


def message_type(data: bytes | memoryview) -> tuple[int, int]:
    """(type, msg_len) of the message at the start of ``data``, ``msg_len``
    checked against the bytes present and the 8-byte minimum."""
    if len(data) < HEADER.size:
        raise RndisError(f"RNDIS message of {len(data)} bytes, under its 8-byte header")
    mtype, length = HEADER.unpack_from(data)
    if length < HEADER.size or length > len(data):
        raise RndisError(f"RNDIS msg_len {length} outside the {len(data)} bytes present")
    return mtype, length


def split_messages(data: bytes | memoryview) -> list[tuple[int, memoryview]]:
    """A buffer holding several RNDIS messages back to back (a batched send
    section): [(type, message)] advancing by each ``msg_len``; trailing
    zero padding ends the list."""
    view = memoryview(data)
    out: list[tuple[int, memoryview]] = []
    offset = 0
    while len(view) - offset >= HEADER.size:
        mtype, length = HEADER.unpack_from(view, offset)
        if mtype == 0 and length == 0:
            break  # padding after the last message
        mtype, length = message_type(view[offset:])
        out.append((mtype, view[offset : offset + length]))
        offset += length
        if len(out) > 64:
            raise RndisError("more than 64 RNDIS messages in one packet")
    return out


# -- data packets ------------------------------------------------------------


@dataclass(frozen=True)
class PerPacketInfo:
    ptype: int  # bits 0-30; bit 31 marks the internal types
    payload: bytes


def parse_packet(msg: memoryview, max_frame: int) -> tuple[memoryview, list[PerPacketInfo]]:
    """The frame and per-packet info of a PACKET_MSG (reference 6.2 rules):
    out-of-band data and a VC handle refused, data inside the message and
    between ``MIN_FRAME`` and ``max_frame`` bytes, per-packet info at most
    ``MAX_PPI_BYTES``, each element's size and payload offset inside it."""
    if len(msg) < PACKET_HEADER_LEN:
        raise RndisError(f"PACKET_MSG of {len(msg)} bytes, under 44")
    (_, length, data_off, data_len, oob_off, oob_len, num_oob, ppi_off, ppi_len, vc, _) = PACKET.unpack_from(msg)
    if length != len(msg):
        raise RndisError("PACKET_MSG length does not match its message")
    if oob_off or oob_len or num_oob or vc:
        raise RndisError("PACKET_MSG with out-of-band data or a VC handle")
    if not MIN_FRAME <= data_len <= max_frame:
        raise RndisError(f"frame of {data_len} bytes (allowed {MIN_FRAME}..{max_frame})")
    start = 8 + data_off
    if data_off < PACKET_HEADER_LEN - 8 or start + data_len > length:
        raise RndisError(f"frame at {data_off}+{data_len} outside the {length}-byte message")
    ppis: list[PerPacketInfo] = []
    if ppi_len:
        if ppi_len > MAX_PPI_BYTES:
            raise RndisError(f"{ppi_len} bytes of per-packet info (at most {MAX_PPI_BYTES})")
        first = 8 + ppi_off
        if ppi_off < PACKET_HEADER_LEN - 8 or first + ppi_len > length:
            raise RndisError(f"per-packet info at {ppi_off}+{ppi_len} outside the message")
        pos, end = first, first + ppi_len
        while pos < end:
            if end - pos < PPI_HEADER.size:
                raise RndisError("truncated per-packet info element")
            size, ptype, offset = PPI_HEADER.unpack_from(msg, pos)
            if size < PPI_HEADER.size or size > end - pos or not PPI_HEADER.size <= offset <= size:
                raise RndisError(f"per-packet info element of size {size}, payload at {offset}")
            ppis.append(PerPacketInfo(ptype, bytes(msg[pos + offset : pos + size])))
            pos += size
    return msg[start : start + data_len], ppis


def packet_header(frame_len: int, ppi: bytes = b"") -> bytes:
    """The 44-byte PACKET_MSG header (plus per-packet info) in front of a
    frame of ``frame_len`` bytes; the frame follows directly."""
    ppi_off = PACKET_HEADER_LEN - 8 if ppi else 0
    data_off = PACKET_HEADER_LEN - 8 + len(ppi)
    length = PACKET_HEADER_LEN + len(ppi) + frame_len
    return PACKET.pack(PACKET_MSG, length, data_off, frame_len, 0, 0, 0, ppi_off, len(ppi), 0, 0) + ppi


def per_packet_info(ptype: int, payload: bytes) -> bytes:
    return PPI_HEADER.pack(PPI_HEADER.size + len(payload), ptype, PPI_HEADER.size) + payload


# -- control requests (guest -> host) ---------------------------------------


@dataclass(frozen=True)
class Request:
    """INITIALIZE, QUERY, SET, KEEPALIVE or HALT, as the host sees it."""

    mtype: int
    req_id: int
    oid: int = 0
    data: bytes = b""  # SET input (copied, at most MAX_OID_INPUT)
    max_transfer: int = 0  # INITIALIZE


def parse_request(msg: memoryview) -> Request:
    mtype, length = message_type(msg)
    if mtype == INITIALIZE_MSG:
        if length < INITIALIZE.size:
            raise RndisError("short INITIALIZE")
        _, _, req_id, major, _minor, max_xfer = INITIALIZE.unpack_from(msg)
        if major != 1:
            raise RndisError(f"RNDIS version {major} (only 1.x)")
        return Request(mtype, req_id, max_transfer=max_xfer)
    if mtype in (QUERY_MSG, SET_MSG):
        if length < REQUEST.size:
            raise RndisError("short QUERY/SET")
        _, _, req_id, oid, buflen, bufoff, _vc = REQUEST.unpack_from(msg)
        data = b""
        if buflen:
            if buflen > MAX_OID_INPUT:
                raise RndisError(f"OID input of {buflen} bytes (at most {MAX_OID_INPUT})")
            if bufoff < REQUEST.size - 8 or 8 + bufoff + buflen > length:
                raise RndisError(f"OID input at {bufoff}+{buflen} outside the {length}-byte message")
            data = bytes(msg[8 + bufoff : 8 + bufoff + buflen])
        return Request(mtype, req_id, oid=oid, data=data)
    if mtype in (KEEPALIVE_MSG, HALT_MSG):
        if length < KEEPALIVE.size:
            raise RndisError("short KEEPALIVE/HALT")
        return Request(mtype, KEEPALIVE.unpack_from(msg)[2])
    raise RndisError(f"RNDIS message type {mtype:#x} is not a request a host takes")


def initialize(req_id: int, max_transfer: int = 0x4000) -> bytes:
    return INITIALIZE.pack(INITIALIZE_MSG, INITIALIZE.size, req_id, 1, 0, max_transfer)


def query(req_id: int, oid: int, data: bytes = b"") -> bytes:
    return REQUEST.pack(QUERY_MSG, REQUEST.size + len(data), req_id, oid, len(data),
                        REQUEST.size - 8 if data else 0, 0) + data


def set_request(req_id: int, oid: int, data: bytes) -> bytes:
    return REQUEST.pack(SET_MSG, REQUEST.size + len(data), req_id, oid, len(data), REQUEST.size - 8, 0) + data


def keepalive(req_id: int) -> bytes:
    return KEEPALIVE.pack(KEEPALIVE_MSG, KEEPALIVE.size, req_id)


def halt(req_id: int) -> bytes:
    return KEEPALIVE.pack(HALT_MSG, KEEPALIVE.size, req_id)


# -- replies and indications (host -> guest) ---------------------------------


def initialize_complete(req_id: int, status: int, max_transfer: int) -> bytes:
    return INITIALIZE_COMPLETE.pack(INITIALIZE_CMPLT, INITIALIZE_COMPLETE.size, req_id, status, 1, 0, 1, 0,
                                    MAX_PACKETS_PER_MESSAGE, max_transfer, PKT_ALIGNMENT_SHIFT, 0, 0)


def query_complete(req_id: int, status: int, data: bytes = b"") -> bytes:
    return QUERY_COMPLETE.pack(QUERY_CMPLT, QUERY_COMPLETE.size + len(data), req_id, status, len(data),
                               QUERY_COMPLETE.size - 8 if data else 0) + data


def set_complete(req_id: int, status: int) -> bytes:
    return SET_COMPLETE.pack(SET_CMPLT, SET_COMPLETE.size, req_id, status)


def keepalive_complete(req_id: int, status: int) -> bytes:
    return KEEPALIVE_COMPLETE.pack(KEEPALIVE_CMPLT, KEEPALIVE_COMPLETE.size, req_id, status)


def indicate_status(status: int, data: bytes = b"") -> bytes:
    return INDICATE_STATUS.pack(INDICATE_STATUS_MSG, INDICATE_STATUS.size + len(data), status, len(data),
                                INDICATE_STATUS.size - 8 if data else 0) + data


@dataclass(frozen=True)
class Reply:
    """A control reply or indication, as the guest sees it."""

    mtype: int
    req_id: int  # 0 for an indication
    status: int
    data: bytes = b""
    max_packets: int = 0  # INITIALIZE_CMPLT
    alignment_shift: int = 0


def _buffer(msg: memoryview, length: int, buflen: int, bufoff: int, least: int) -> bytes:
    """Linux's rule for a reply buffer: offset at least ``least``, inside msg_len - 8."""
    if not buflen:
        return b""
    if bufoff < least or bufoff + buflen > length - 8 or buflen > MAX_OID_INPUT:
        raise RndisError(f"reply buffer at {bufoff}+{buflen} outside the {length}-byte message")
    return bytes(msg[8 + bufoff : 8 + bufoff + buflen])


def parse_reply(msg: memoryview) -> Reply:
    mtype, length = message_type(msg)
    if mtype == INITIALIZE_CMPLT and length >= INITIALIZE_COMPLETE.size:
        f = INITIALIZE_COMPLETE.unpack_from(msg)
        return Reply(mtype, f[2], f[3], max_packets=f[8], alignment_shift=f[10])
    if mtype == QUERY_CMPLT and length >= QUERY_COMPLETE.size:
        _, _, req_id, status, buflen, bufoff = QUERY_COMPLETE.unpack_from(msg)
        return Reply(mtype, req_id, status, _buffer(msg, length, buflen, bufoff, 16))
    if mtype in (SET_CMPLT, KEEPALIVE_CMPLT, RESET_CMPLT) and length >= SET_COMPLETE.size:
        _, _, req_id, status = SET_COMPLETE.unpack_from(msg)
        return Reply(mtype, req_id, status)
    if mtype == INDICATE_STATUS_MSG and length >= INDICATE_STATUS.size:
        _, _, status, buflen, bufoff = INDICATE_STATUS.unpack_from(msg)
        return Reply(mtype, 0, status, _buffer(msg, length, buflen, bufoff, 12))
    raise RndisError(f"RNDIS reply type {mtype:#x} of {length} bytes is not one a guest takes")
