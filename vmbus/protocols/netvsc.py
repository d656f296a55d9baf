"""NVSP, the synthetic NIC's own protocol over its VMBus channel.

Byte layouts from docs/netvsc-reference sections 1-5 (Linux
``drivers/net/hyperv/hyperv_net.h``, DPDK ``drivers/net/netvsc/hn_nvs.h``,
OpenVMM ``vm/devices/net/netvsp/src/protocol.rs``).  Every NVSP message is
``u32 msg_type`` and a body; both sides send 40 bytes (zero padded), which
satisfies every reader's minimum (reference 2), and read only the prefix a
message type needs, refusing a shorter one.

The NIC's frames and control requests travel as RNDIS messages
(``vmbus.protocols.rndis``):

- guest -> host: an in-band ``SEND_RNDIS_PACKET`` naming a section of the
  send buffer (copied there by the guest, several messages batched in one
  section), or a GPA-direct packet whose page ranges hold them;
- host -> guest: a transfer-page packet whose ranges name sub-allocations
  of the receive buffer, its transaction id the first sub-allocation's
  index (DPDK refuses anything larger than the section count).

Both buffers are GPADLs of their own (``Channel.gpadl``).  The receive
buffer is cut into ``sub_alloc`` byte sub-allocations, the first
``CONTROL_SECTIONS`` reserved for control replies and indications (as
OpenVMM), the last 36 bytes of each never used (reference 5).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum

INTERFACE_ID = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
MESSAGE_SIZE = 40


class Msg(IntEnum):
    INIT = 1
    INIT_COMPLETE = 2
    SEND_NDIS_VERSION = 100
    SEND_RECEIVE_BUFFER = 101
    SEND_RECEIVE_BUFFER_COMPLETE = 102
    REVOKE_RECEIVE_BUFFER = 103
    SEND_SEND_BUFFER = 104
    SEND_SEND_BUFFER_COMPLETE = 105
    REVOKE_SEND_BUFFER = 106
    SEND_RNDIS_PACKET = 107
    SEND_RNDIS_PACKET_COMPLETE = 108
    SEND_NDIS_CONFIG = 125
    SUBCHANNEL = 133


class Status(IntEnum):
    NONE = 0
    SUCCESS = 1
    FAIL = 2


V1, V2, V4, V5, V6, V61 = 0x2, 0x30002, 0x40000, 0x50000, 0x60000, 0x60001
VERSIONS = (V61, V6, V5, V4, V2, V1)  # newest first, as a guest tries them
# The first version at which each message type exists (OpenVMM gates them).
SINCE = {Msg.SEND_NDIS_CONFIG: V2, Msg.SUBCHANNEL: V5}
NDIS_6_1, NDIS_6_30 = 0x00060001, 0x0006001E

RECEIVE_BUFFER_ID = 0xCAFE
SEND_BUFFER_ID = 0
NO_SECTION = 0xFFFFFFFF
CHANNEL_DATA, CHANNEL_CONTROL = 0, 1

FRAME_MTU_DEFAULT = 1514  # an Ethernet frame without FCS for an L3 MTU of 1500
FRAME_MTU_MIN, FRAME_MTU_MAX = 1514, 9216  # the NDIS-config MTU accepted (else 1514: vmswitch)
CONTROL_SECTIONS = 16  # receive sub-allocations kept for control replies
SUB_ALLOC_TAIL = 36  # bytes at the end of each sub-allocation never written
SEND_SECTION_SIZE = 6144
MAX_RANGES = 375  # ranges in one transfer-page packet (Windows header, reference 5)

HEADER = struct.Struct("<I")
INIT = struct.Struct("<III")  # type, min_protocol_ver, max_protocol_ver
INIT_COMPLETE = struct.Struct("<IIII")  # type, negotiated (deprecated), max_mdl_chain_len, status
NDIS_VERSION = struct.Struct("<III")  # type, major, minor
NDIS_CONFIG = struct.Struct("<IIIQ")  # type, mtu, reserved, capabilities
BUFFER = struct.Struct("<IIH")  # SEND_RECEIVE_BUFFER / SEND_SEND_BUFFER: type, gpadl, id
RECEIVE_BUFFER_COMPLETE = struct.Struct("<III")  # type, status, num_sections; then sections
SECTION = struct.Struct("<IIII")  # offset, sub_alloc_size, num_sub_allocs, end_offset
SEND_BUFFER_COMPLETE = struct.Struct("<III")  # type, status, section_size
REVOKE = struct.Struct("<IH")  # type, id
RNDIS_PACKET = struct.Struct("<IIII")  # type, channel_type, section_index, section_size
RNDIS_PACKET_COMPLETE = struct.Struct("<II")  # type, status
XFER_PAGE_HEADER = struct.Struct("<HBBI")  # pageset id, sender owns, reserved, range count
XFER_RANGE = struct.Struct("<II")  # byte_count, byte_offset

# The body each guest-to-host message type must carry at least.
REQUIRED = {
    Msg.INIT: INIT.size, Msg.SEND_NDIS_VERSION: NDIS_VERSION.size, Msg.SEND_NDIS_CONFIG: NDIS_CONFIG.size,
    Msg.SEND_RECEIVE_BUFFER: BUFFER.size, Msg.SEND_SEND_BUFFER: BUFFER.size, Msg.REVOKE_RECEIVE_BUFFER: REVOKE.size,
    Msg.REVOKE_SEND_BUFFER: REVOKE.size, Msg.SEND_RNDIS_PACKET: RNDIS_PACKET.size,
    Msg.SEND_RNDIS_PACKET_COMPLETE: RNDIS_PACKET_COMPLETE.size,
}


class NvspError(ValueError):
    """A malformed or out-of-order NVSP message (the words say what)."""


def message(fmt: struct.Struct, *fields: int) -> bytes:
    """One NVSP message, zero padded to the 40 bytes every reader accepts."""
    return fmt.pack(*fields).ljust(MESSAGE_SIZE, b"\0")


def parse(payload: bytes | memoryview, version: int | None = None) -> tuple[Msg, tuple[int, ...]]:
    """(type, fields) of a guest-to-host message: the type known and allowed
    at the negotiated ``version``, the body as long as the type needs."""
    if len(payload) < HEADER.size:
        raise NvspError(f"NVSP message of {len(payload)} bytes")
    (raw,) = HEADER.unpack_from(payload)
    try:
        mtype = Msg(raw)
    except ValueError:
        raise NvspError(f"NVSP message type {raw}") from None
    if mtype not in REQUIRED:
        raise NvspError(f"NVSP {mtype.name} is not a guest-to-host message a host takes")
    if version is not None and version < SINCE.get(mtype, 0):
        raise NvspError(f"NVSP {mtype.name} before protocol {SINCE[mtype]:#x}")
    need = REQUIRED[mtype]
    if len(payload) < need:
        raise NvspError(f"NVSP {mtype.name} of {len(payload)} bytes (needs {need})")
    fmt = {Msg.INIT: INIT, Msg.SEND_NDIS_VERSION: NDIS_VERSION, Msg.SEND_NDIS_CONFIG: NDIS_CONFIG,
           Msg.SEND_RECEIVE_BUFFER: BUFFER, Msg.SEND_SEND_BUFFER: BUFFER, Msg.REVOKE_RECEIVE_BUFFER: REVOKE,
           Msg.REVOKE_SEND_BUFFER: REVOKE, Msg.SEND_RNDIS_PACKET: RNDIS_PACKET,
           Msg.SEND_RNDIS_PACKET_COMPLETE: RNDIS_PACKET_COMPLETE}[mtype]
    return mtype, fmt.unpack_from(payload)[1:]


@dataclass(frozen=True)
class ReceiveLayout:
    """How the host cut the guest's receive buffer (one section)."""

    sub_alloc: int
    count: int

    @property
    def usable(self) -> int:
        """Bytes of one sub-allocation a message may fill."""
        return self.sub_alloc - SUB_ALLOC_TAIL

    def encode(self) -> bytes:
        end = self.sub_alloc * self.count
        return message(struct.Struct("<IIIIIII"), Msg.SEND_RECEIVE_BUFFER_COMPLETE, Status.SUCCESS, 1,
                       0, self.sub_alloc, self.count, end)


def receive_sub_alloc(frame_mtu: int) -> int:
    """A sub-allocation for one frame: the RNDIS header and info, the frame
    and the unusable tail, 8-byte aligned (OpenVMM uses 256 + mtu + 36)."""
    return (256 + frame_mtu + SUB_ALLOC_TAIL + 7) & ~7


def parse_receive_layout(payload: bytes | memoryview, buffer_size: int) -> ReceiveLayout:
    """The guest's check of SEND_RECEIVE_BUFFER_COMPLETE (Linux's rules):
    success, exactly one section at offset 0, sub-allocations of at least 68
    bytes and all of them inside the buffer it gave."""
    if len(payload) < RECEIVE_BUFFER_COMPLETE.size + SECTION.size:
        raise NvspError("short SEND_RECEIVE_BUFFER_COMPLETE")
    mtype, status, sections = RECEIVE_BUFFER_COMPLETE.unpack_from(payload)
    if mtype != Msg.SEND_RECEIVE_BUFFER_COMPLETE or status != Status.SUCCESS or sections != 1:
        raise NvspError(f"receive buffer refused (type {mtype}, status {status}, {sections} sections)")
    offset, size, count, _end = SECTION.unpack_from(payload, RECEIVE_BUFFER_COMPLETE.size)
    if offset or size < 68 or count <= CONTROL_SECTIONS or size * count > buffer_size:
        raise NvspError(f"receive section {offset}: {count} x {size} bytes does not fit {buffer_size}")
    return ReceiveLayout(size, count)


def xfer_header(ranges: list[tuple[int, int]]) -> bytes:
    """The transfer-page header: the receive buffer's id, then (count, offset) ranges."""
    return XFER_PAGE_HEADER.pack(RECEIVE_BUFFER_ID, 0, 0, len(ranges)) + b"".join(
        XFER_RANGE.pack(count, offset) for count, offset in ranges)


def parse_xfer_header(header: bytes | memoryview) -> list[tuple[int, int]]:
    """(byte_count, byte_offset) ranges of a transfer-page packet."""
    if len(header) < XFER_PAGE_HEADER.size:
        raise NvspError("short transfer-page header")
    pageset, _, _, count = XFER_PAGE_HEADER.unpack_from(header)
    if pageset != RECEIVE_BUFFER_ID or not 0 < count <= MAX_RANGES:
        raise NvspError(f"transfer-page packet for set {pageset:#x} with {count} ranges")
    if len(header) < XFER_PAGE_HEADER.size + count * XFER_RANGE.size:
        raise NvspError(f"transfer-page header too short for {count} ranges")
    return [XFER_RANGE.unpack_from(header, XFER_PAGE_HEADER.size + i * XFER_RANGE.size) for i in range(count)]


GPA_HEADER = struct.Struct("<II")  # reserved, range count (after the descriptor)


def parse_gpa_ranges(header: bytes | memoryview, max_ranges: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(byte_count, byte_offset, pfns) of each range of a GPA-direct packet:
    at most ``max_ranges``, each offset inside its first page and its page
    list as long as offset + count needs and present in the header."""
    if len(header) < GPA_HEADER.size:
        raise NvspError("short GPA-direct header")
    _, count = GPA_HEADER.unpack_from(header)
    if not 0 < count <= max_ranges:
        raise NvspError(f"GPA-direct packet with {count} ranges (1..{max_ranges})")
    out = []
    pos = GPA_HEADER.size
    for _ in range(count):
        if len(header) - pos < XFER_RANGE.size:
            raise NvspError("GPA-direct range list shorter than its count")
        byte_count, byte_offset = XFER_RANGE.unpack_from(header, pos)
        pos += XFER_RANGE.size
        if not byte_count or byte_offset >= 4096:
            raise NvspError(f"GPA-direct range of {byte_count} bytes at offset {byte_offset}")
        pages = (byte_offset + byte_count + 4095) // 4096
        if len(header) - pos < 8 * pages:
            raise NvspError(f"GPA-direct range needs {pages} pages, the header is short")
        out.append((byte_count, byte_offset, struct.unpack_from(f"<{pages}Q", header, pos)))
        pos += 8 * pages
    return out
