"""VMBus channel (control) messages: types, versions and byte layouts.

Every message is an 8-byte header (msgtype, padding) plus a fixed body,
at most 240 bytes in all (one HvPostMessage payload).  Layouts follow
torvalds/linux include/linux/hyperv.h and microsoft/openvmm
vm/devices/vmbus/vmbus_core/src/protocol.rs (reference section 3.4);
``tests/vmbus/test_protocol.py`` pins every size and field offset.

``decode`` is the only way bytes from the peer become a message: it
checks the type is known and the length reaches the type's minimum, and
returns a ``ProtocolError`` naming what was wrong, never an exception
escaping from ``struct``.  GPADL messages carry a PFN list after the
fixed part; the list is parsed with the same care (counts checked against
the bytes actually present).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import ClassVar, Final

HEADER: Final = struct.Struct("<II")
MAX_MESSAGE_SIZE: Final = 240
GPADL_HEADER_PFNS: Final = 26  # (240 - 20 - 8) / 8, DPDK VMBUS_CHANMSG_GPADL_CONN_PGMAX
GPADL_BODY_PFNS: Final = 28  # (240 - 16) / 8, DPDK VMBUS_CHANMSG_GPADL_SUBCONN_PGMAX
STATUS_SUCCESS: Final = 0
STATUS_UNSUCCESSFUL: Final = 0x8000FFFF


class MsgType(IntEnum):
    OFFERCHANNEL = 1
    RESCIND_CHANNELOFFER = 2
    REQUESTOFFERS = 3
    ALLOFFERS_DELIVERED = 4
    OPENCHANNEL = 5
    OPENCHANNEL_RESULT = 6
    CLOSECHANNEL = 7
    GPADL_HEADER = 8
    GPADL_BODY = 9
    GPADL_CREATED = 10
    GPADL_TEARDOWN = 11
    GPADL_TORNDOWN = 12
    RELID_RELEASED = 13
    INITIATE_CONTACT = 14
    VERSION_RESPONSE = 15
    UNLOAD = 16
    UNLOAD_RESPONSE = 17


class Version(IntEnum):
    """Protocol versions, (major << 16) | minor (hyperv.h VERSION_*)."""

    WS2008 = 0x0000000D
    WIN7 = 0x00010001
    WIN8 = 0x00020004
    WIN8_1 = 0x00030000
    WIN10 = 0x00040000
    WIN10_V4_1 = 0x00040001
    WIN10_V5 = 0x00050000
    WIN10_V5_1 = 0x00050001
    WIN10_V5_2 = 0x00050002
    WIN10_V5_3 = 0x00050003


# What this project's guest asks for, newest first (as Linux's list).
GUEST_VERSIONS: Final = (
    Version.WIN10_V5_3, Version.WIN10_V5_2, Version.WIN10_V5_1, Version.WIN10_V5,
    Version.WIN10_V4_1, Version.WIN10, Version.WIN8_1,
)
# At 5.0 and later INITIATE_CONTACT goes to connection id 4 and the host
# names the connection id for everything after (reference section 3.3).
CONNECTION_ID_CHANGE: Final = Version.WIN10_V5


class ProtocolError(Exception):
    """Peer gave us a malformed, truncated or unknown message."""


def guid_to_wire(value: uuid.UUID) -> bytes:
    """Windows GUID byte order: first three fields little-endian."""
    return value.bytes_le


def guid_from_wire(data: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(data))


@dataclass
class Message:
    """Base of every channel message; subclasses declare ``BODY`` and ``TYPE``."""

    TYPE: ClassVar[MsgType]
    BODY: ClassVar[struct.Struct] = struct.Struct("<")

    @classmethod
    def size(cls) -> int:
        return HEADER.size + cls.BODY.size

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if f.init and f.metadata.get("wire", True))

    def tail(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        data = HEADER.pack(self.TYPE, 0) + self.BODY.pack(*self._values()) + self.tail()
        if len(data) > MAX_MESSAGE_SIZE:
            raise ValueError(f"{type(self).__name__} is {len(data)} bytes, more than {MAX_MESSAGE_SIZE}")
        return data

    @classmethod
    def parse(cls, data: bytes) -> Message:
        values = cls.BODY.unpack_from(data, HEADER.size)
        return cls(*values)


@dataclass
class InitiateContact(Message):
    TYPE = MsgType.INITIATE_CONTACT
    BODY = struct.Struct("<IIQQQ")
    version_requested: int = 0
    target_vcpu: int = 0
    target_info: int = 0  # < 5.0: interrupt page GPA; >= 5.0: byte 0 msg_sint, byte 1 msg_vtl
    monitor_page1: int = 0
    monitor_page2: int = 0

    @property
    def msg_sint(self) -> int:
        return self.target_info & 0xFF


@dataclass
class VersionResponse(Message):
    TYPE = MsgType.VERSION_RESPONSE
    BODY = struct.Struct("<BBHI")
    version_supported: int = 0
    connection_state: int = 0
    padding: int = 0
    msg_conn_id: int = 0


@dataclass
class OfferChannel(Message):
    TYPE = MsgType.OFFERCHANNEL
    BODY = struct.Struct("<16s16sQQHH120sHHIBBHI")
    if_type: bytes = bytes(16)
    if_instance: bytes = bytes(16)
    reserved1: int = 0
    reserved2: int = 0
    chn_flags: int = 0
    mmio_megabytes: int = 0
    user_defined: bytes = bytes(120)
    sub_channel_index: int = 0
    reserved3: int = 0
    child_relid: int = 0
    monitorid: int = 0
    monitor_allocated: int = 0
    is_dedicated_interrupt: int = 0
    connection_id: int = 0

    @property
    def interface(self) -> uuid.UUID:
        return guid_from_wire(self.if_type)

    @property
    def instance(self) -> uuid.UUID:
        return guid_from_wire(self.if_instance)


@dataclass
class RescindChannelOffer(Message):
    TYPE = MsgType.RESCIND_CHANNELOFFER
    BODY = struct.Struct("<I")
    child_relid: int = 0


@dataclass
class RequestOffers(Message):
    TYPE = MsgType.REQUESTOFFERS


@dataclass
class AllOffersDelivered(Message):
    TYPE = MsgType.ALLOFFERS_DELIVERED


@dataclass
class OpenChannel(Message):
    TYPE = MsgType.OPENCHANNEL
    BODY = struct.Struct("<IIIII120s")
    child_relid: int = 0
    openid: int = 0
    ringbuffer_gpadl: int = 0
    target_vp: int = 0
    downstream_ring_page_offset: int = 0
    userdata: bytes = bytes(120)


@dataclass
class OpenChannelResult(Message):
    TYPE = MsgType.OPENCHANNEL_RESULT
    BODY = struct.Struct("<III")
    child_relid: int = 0
    openid: int = 0
    status: int = 0


@dataclass
class CloseChannel(Message):
    TYPE = MsgType.CLOSECHANNEL
    BODY = struct.Struct("<I")
    child_relid: int = 0


GPA_RANGE_HEAD: Final = struct.Struct("<II")


@dataclass
class GpadlHeader(Message):
    """GPADL_HEADER: one range (as Linux sends) whose first PFNs ride here.

    ``range_buflen`` is the byte length of the whole range data, i.e.
    8 + 8 * total PFN count; the host knows the GPADL is complete when it
    has collected that many PFNs over this header and its bodies.
    """

    TYPE = MsgType.GPADL_HEADER
    BODY = struct.Struct("<IIHH")
    child_relid: int = 0
    gpadl: int = 0
    range_buflen: int = 0
    rangecount: int = 1
    byte_count: int = field(default=0, metadata={"wire": False})
    byte_offset: int = field(default=0, metadata={"wire": False})
    pfns: tuple[int, ...] = field(default=(), metadata={"wire": False})

    @property
    def total_pfns(self) -> int:
        return max(0, (self.range_buflen - GPA_RANGE_HEAD.size) // 8)

    def tail(self) -> bytes:
        return GPA_RANGE_HEAD.pack(self.byte_count, self.byte_offset) + struct.pack(f"<{len(self.pfns)}Q", *self.pfns)

    @classmethod
    def parse(cls, data: bytes) -> Message:
        relid, gpadl, buflen, count = cls.BODY.unpack_from(data, HEADER.size)
        off = HEADER.size + cls.BODY.size
        if count != 1:
            raise ProtocolError(f"GPADL_HEADER with {count} ranges (only 1 is supported)")
        if len(data) < off + GPA_RANGE_HEAD.size:
            raise ProtocolError("GPADL_HEADER truncated before its range")
        byte_count, byte_offset = GPA_RANGE_HEAD.unpack_from(data, off)
        off += GPA_RANGE_HEAD.size
        present = (len(data) - off) // 8
        msg = cls(relid, gpadl, buflen, count, byte_count, byte_offset)
        msg.pfns = struct.unpack_from(f"<{min(present, msg.total_pfns)}Q", data, off)
        return msg


@dataclass
class GpadlBody(Message):
    TYPE = MsgType.GPADL_BODY
    BODY = struct.Struct("<II")
    msgnumber: int = 0
    gpadl: int = 0
    pfns: tuple[int, ...] = field(default=(), metadata={"wire": False})

    def tail(self) -> bytes:
        return struct.pack(f"<{len(self.pfns)}Q", *self.pfns)

    @classmethod
    def parse(cls, data: bytes) -> Message:
        msgnumber, gpadl = cls.BODY.unpack_from(data, HEADER.size)
        off = HEADER.size + cls.BODY.size
        return cls(msgnumber, gpadl, struct.unpack_from(f"<{(len(data) - off) // 8}Q", data, off))


@dataclass
class GpadlCreated(Message):
    TYPE = MsgType.GPADL_CREATED
    BODY = struct.Struct("<III")
    child_relid: int = 0
    gpadl: int = 0
    creation_status: int = 0


@dataclass
class GpadlTeardown(Message):
    TYPE = MsgType.GPADL_TEARDOWN
    BODY = struct.Struct("<II")
    child_relid: int = 0
    gpadl: int = 0


@dataclass
class GpadlTorndown(Message):
    TYPE = MsgType.GPADL_TORNDOWN
    BODY = struct.Struct("<I")
    gpadl: int = 0


@dataclass
class RelidReleased(Message):
    TYPE = MsgType.RELID_RELEASED
    BODY = struct.Struct("<I")
    child_relid: int = 0


@dataclass
class Unload(Message):
    TYPE = MsgType.UNLOAD


@dataclass
class UnloadResponse(Message):
    TYPE = MsgType.UNLOAD_RESPONSE


MESSAGES: Final[dict[int, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        InitiateContact, VersionResponse, OfferChannel, RescindChannelOffer, RequestOffers,
        AllOffersDelivered, OpenChannel, OpenChannelResult, CloseChannel, GpadlHeader, GpadlBody,
        GpadlCreated, GpadlTeardown, GpadlTorndown, RelidReleased, Unload, UnloadResponse,
    )
}


def decode(data: bytes) -> Message:
    """Bytes from the peer to a message, or ``ProtocolError``."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than the header")
    if len(data) > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    msgtype, _ = HEADER.unpack_from(data)
    cls = MESSAGES.get(msgtype)
    if cls is None:
        raise ProtocolError(f"unknown message type {msgtype}")
    if len(data) < cls.size():
        raise ProtocolError(f"{cls.TYPE.name} truncated: {len(data)} of {cls.size()} bytes")
    try:
        return cls.parse(bytes(data))
    except struct.error as exc:  # pragma: no cover - sizes are checked above
        raise ProtocolError(f"{cls.TYPE.name}: {exc}") from exc


def gpadl_messages(
    relid: int, gpadl: int, pfns: list[int], byte_count: int, byte_offset: int = 0
) -> list[GpadlHeader | GpadlBody]:
    """A GPADL as a header plus as many bodies as its PFN list needs."""
    head = GpadlHeader(relid, gpadl, GPA_RANGE_HEAD.size + 8 * len(pfns), 1, byte_count, byte_offset,
                       tuple(pfns[:GPADL_HEADER_PFNS]))
    out: list[GpadlHeader | GpadlBody] = [head]
    rest = pfns[GPADL_HEADER_PFNS:]
    for i in range(0, len(rest), GPADL_BODY_PFNS):
        out.append(GpadlBody(0, gpadl, tuple(rest[i : i + GPADL_BODY_PFNS])))
    return out
