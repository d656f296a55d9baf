"""Wire format of the integration services: heartbeat, shutdown, timesync, KVP.

Every IC message is one in-band packet whose payload is

    pipe header   u32 flags (DATA = 1), u32 msgsize (bytes after it)    8 bytes
    ICMSG header  framework version, message type, service version,
                  icmsgsize (body bytes), status, transaction id, flags  20 bytes
    body          per message type                                       icmsgsize bytes

(``ic-reference.md`` sections 2-7; Linux ``include/linux/hyperv.h``,
OpenVMM ``vm/devices/hyperv_ic_protocol``).  The host sends a request
(flags TRANSACTION | REQUEST), the guest answers with the same message
type (flags TRANSACTION | RESPONSE) and a status.  The first exchange on
every channel is NEGOTIATE: the host lists the framework and service
versions it speaks, the guest picks one of each from its own preference
list, as Linux's ``vmbus_prep_negotiate_resp`` does.

Both sides parse with the functions below and nothing else.  They trust
no length: the pipe ``msgsize`` and ``icmsgsize`` are checked against the
bytes actually present, version counts are capped at 100 (Linux's
``IC_VERSION_NEGOTIATION_MAX_VER_COUNT``), KVP key and value sizes at
512 and 2048 bytes (UTF-16 with its NUL), and every failure is an
``IcFormatError`` naming what is wrong.
"""

from __future__ import annotations

import enum
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# -- GUIDs (vmbus-reference.md section 5, ic-reference.md section 9) ---------------

HEARTBEAT_ID: Final = uuid.UUID("57164f39-9115-4e78-ab55-382f3bd5422d")
SHUTDOWN_ID: Final = uuid.UUID("0e0b6031-5213-4934-818b-38d90ced39db")
TIMESYNC_ID: Final = uuid.UUID("9527e630-d0ae-497b-adce-e80ab0175caf")
KVP_ID: Final = uuid.UUID("a9a0f4e7-5a45-4d96-b827-8a841e8c03e6")

# -- framing -------------------------------------------------------------------------

PIPE_HEADER: Final = struct.Struct("<II")  # flags, msgsize
PIPE_DATA: Final = 1
# framework major/minor, msgtype, message major/minor, icmsgsize, status, transaction id, flags, reserved
ICMSG_HEADER: Final = struct.Struct("<HHHHHHIBBH")
HEADER_SIZE: Final = PIPE_HEADER.size + ICMSG_HEADER.size  # ICMSG_HDR = 28: bodies start here
MAX_MESSAGE: Final = 16 << 10  # the largest IC packet either side reads (Linux KVP: 4 pages)


class MsgType(enum.IntEnum):
    NEGOTIATE = 0
    HEARTBEAT = 1
    KVP = 2
    SHUTDOWN = 3
    TIMESYNC = 4


class Flag(enum.IntFlag):
    TRANSACTION = 1
    REQUEST = 2
    RESPONSE = 4


REQUEST_FLAGS: Final = Flag.TRANSACTION | Flag.REQUEST
RESPONSE_FLAGS: Final = Flag.TRANSACTION | Flag.RESPONSE


class Status(enum.IntEnum):
    """HRESULT-style status words (Linux uapi, OpenVMM ``Status``)."""

    OK = 0
    FAIL = 0x80004005
    NO_MORE_ITEMS = 0x80070103  # S_CONT: end of a KVP enumeration
    NOT_SUPPORTED = 0x80070032
    NOT_FOUND = 0x80041002
    INVALID_ARG = 0x80070057
    ALREADY_EXISTS = 0x80070050
    DISK_FULL = 0x80070070


def status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return f"{status:#010x}"


class IcFormatError(ValueError):
    """A message that does not parse: the text says what is wrong."""


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


NO_VERSION: Final = Version(0, 0)


@dataclass(frozen=True)
class IcMessage:
    """One parsed IC message; ``body`` is exactly ``icmsgsize`` bytes."""

    framework: Version
    msgtype: int
    version: Version
    status: int
    transaction_id: int
    flags: int
    body: bytes

    @property
    def is_response(self) -> bool:
        return self.flags & RESPONSE_FLAGS == RESPONSE_FLAGS

    @property
    def is_request(self) -> bool:
        return self.flags & REQUEST_FLAGS == REQUEST_FLAGS


def encode_message(
    msgtype: int,
    body: bytes,
    *,
    framework: Version = NO_VERSION,
    version: Version = NO_VERSION,
    status: int = Status.OK,
    flags: int = REQUEST_FLAGS,
    transaction_id: int = 0,
) -> bytes:
    """Pipe header + ICMSG header + ``body``, ready to send as an in-band packet."""
    if len(body) > 0xFFFF:
        raise ValueError(f"IC body of {len(body)} bytes does not fit icmsgsize")
    icmsg = ICMSG_HEADER.pack(framework.major, framework.minor, msgtype, version.major, version.minor,
                              len(body), status, transaction_id, flags, 0)
    return PIPE_HEADER.pack(PIPE_DATA, len(icmsg) + len(body)) + icmsg + body


def parse_message(payload: bytes | memoryview) -> IcMessage:
    """A packet payload from the other side to an ``IcMessage``.  The pipe
    header must say DATA with a ``msgsize`` within the payload (which the
    ring pads to 8 bytes), and ``icmsgsize`` must fit inside ``msgsize``."""
    if len(payload) > MAX_MESSAGE:
        raise IcFormatError(f"message of {len(payload)} bytes (at most {MAX_MESSAGE})")
    if len(payload) < HEADER_SIZE:
        raise IcFormatError(f"message of {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte header")
    pipe_flags, msgsize = PIPE_HEADER.unpack_from(payload)
    if pipe_flags != PIPE_DATA:
        raise IcFormatError(f"pipe header flags {pipe_flags:#x}, not DATA")
    if not ICMSG_HEADER.size <= msgsize <= len(payload) - PIPE_HEADER.size:
        raise IcFormatError(f"pipe msgsize {msgsize} outside {ICMSG_HEADER.size}..{len(payload) - PIPE_HEADER.size}")
    fmaj, fmin, msgtype, mmaj, mmin, size, status, tid, flags, _ = ICMSG_HEADER.unpack_from(payload, PIPE_HEADER.size)
    if size > msgsize - ICMSG_HEADER.size:
        raise IcFormatError(f"icmsgsize {size} is more than the {msgsize - ICMSG_HEADER.size} bytes present")
    return IcMessage(Version(fmaj, fmin), msgtype, Version(mmaj, mmin), status, tid, flags,
                     bytes(payload[HEADER_SIZE : HEADER_SIZE + size]))


def response(request: IcMessage, status: int, body: bytes) -> bytes:
    """The answer to ``request``: its type, versions and transaction id,
    flags TRANSACTION | RESPONSE."""
    return encode_message(request.msgtype, body, framework=request.framework, version=request.version,
                          status=status, flags=RESPONSE_FLAGS, transaction_id=request.transaction_id)


# -- NEGOTIATE (type 0) -----------------------------------------------------------------

NEGOTIATE_HEAD: Final = struct.Struct("<HHI")  # framework count, message count, reserved
VERSION: Final = struct.Struct("<HH")
MAX_VERSION_COUNT: Final = 100  # Linux IC_VERSION_NEGOTIATION_MAX_VER_COUNT

FRAMEWORK_VERSIONS_HOST: Final = (Version(1, 0), Version(3, 0))  # oldest first, as OpenVMM offers
FRAMEWORK_VERSIONS_GUEST: Final = (Version(3, 0), Version(1, 0))  # preference order, as Linux
# Per service: (what the host offers, oldest first; the guest's preference order), ic-reference.md section 3.
HEARTBEAT_VERSIONS: Final = ((Version(1, 0), Version(3, 0)), (Version(3, 0), Version(1, 0)))
SHUTDOWN_VERSIONS: Final = ((Version(1, 0), Version(3, 0), Version(3, 1), Version(3, 2)),
                            (Version(3, 2), Version(3, 1), Version(3, 0), Version(1, 0)))
TIMESYNC_VERSIONS: Final = ((Version(4, 0),), (Version(4, 0), Version(3, 0), Version(1, 0)))
KVP_VERSIONS: Final = ((Version(3, 0), Version(4, 0)), (Version(4, 0), Version(3, 0), Version(1, 0)))


def encode_negotiate(frameworks: tuple[Version, ...], versions: tuple[Version, ...]) -> bytes:
    body = NEGOTIATE_HEAD.pack(len(frameworks), len(versions), 0)
    return body + b"".join(VERSION.pack(v.major, v.minor) for v in (*frameworks, *versions))


def parse_negotiate(body: bytes) -> tuple[list[Version], list[Version]]:
    """(framework versions, service versions) of a NEGOTIATE body."""
    if len(body) < NEGOTIATE_HEAD.size:
        raise IcFormatError(f"negotiate body of {len(body)} bytes")
    nframe, nmsg, _ = NEGOTIATE_HEAD.unpack_from(body)
    if nframe > MAX_VERSION_COUNT or nmsg > MAX_VERSION_COUNT:
        raise IcFormatError(f"{nframe} framework and {nmsg} message versions (at most {MAX_VERSION_COUNT} each)")
    if len(body) < NEGOTIATE_HEAD.size + VERSION.size * (nframe + nmsg):
        raise IcFormatError(f"{nframe}+{nmsg} versions do not fit a {len(body)}-byte body")
    found = [Version(*VERSION.unpack_from(body, NEGOTIATE_HEAD.size + VERSION.size * i)) for i in range(nframe + nmsg)]
    return found[:nframe], found[nframe:]


def choose_versions(
    own_frameworks: tuple[Version, ...], own_versions: tuple[Version, ...], body: bytes
) -> tuple[Version, Version] | None:
    """The guest's pick: the first of its own framework versions, in its
    preference order, found anywhere in the host's list, likewise for the
    service; None when either has no match or the body does not parse."""
    try:
        frameworks, versions = parse_negotiate(body)
    except IcFormatError:
        return None
    framework = next((v for v in own_frameworks if v in frameworks), None)
    version = next((v for v in own_versions if v in versions), None)
    return None if framework is None or version is None else (framework, version)


def negotiate_answer(choice: tuple[Version, Version] | None) -> bytes:
    """The guest's NEGOTIATE body: counts 1/1 and the pick, or 0/0 (no match)."""
    return encode_negotiate((choice[0],), (choice[1],)) if choice else encode_negotiate((), ())


def parse_negotiate_answer(
    body: bytes, offered_frameworks: tuple[Version, ...], offered_versions: tuple[Version, ...]
) -> tuple[Version, Version]:
    """The host's check of the guest's pick: counts exactly 1/1, both
    versions from what the host offered (ic-reference.md section 10.3)."""
    frameworks, versions = parse_negotiate(body)
    if not frameworks and not versions:
        raise IcFormatError("the guest shares no version with the host")
    if len(frameworks) != 1 or len(versions) != 1:
        raise IcFormatError(f"the guest answered {len(frameworks)}/{len(versions)} versions, not 1/1")
    if frameworks[0] not in offered_frameworks or versions[0] not in offered_versions:
        raise IcFormatError(f"the guest picked {frameworks[0]}/{versions[0]}, which the host did not offer")
    return frameworks[0], versions[0]


# -- HEARTBEAT (type 1) -----------------------------------------------------------------

HEARTBEAT: Final = struct.Struct("<Q32x")  # Linux heartbeat_msg_data: seq_num + u32 reserved[8]
HEARTBEAT_MIN: Final = 8  # Linux reads only the sequence: "the host may not fill it up entirely"


def parse_heartbeat(body: bytes) -> int:
    if len(body) < HEARTBEAT_MIN:
        raise IcFormatError(f"heartbeat body of {len(body)} bytes (at least {HEARTBEAT_MIN})")
    return int.from_bytes(body[:8], "little")


def heartbeat_answer(body: bytes) -> bytes:
    """The guest's answer: the same body with the sequence number plus one."""
    seq = parse_heartbeat(body)
    return ((seq + 1) & (1 << 64) - 1).to_bytes(8, "little") + body[8:]


# -- SHUTDOWN (type 3) ------------------------------------------------------------------

SHUTDOWN: Final = struct.Struct("<III2048s")  # reason code, timeout seconds, flags, display message
SHUTDOWN_FORCE: Final = 1
SHUTDOWN_RESTART: Final = 2
SHUTDOWN_HIBERNATE: Final = 4
REASON_PLANNED: Final = 0x80000000  # SHTDN_REASON_FLAG_PLANNED, what OpenVMM's host sends


@dataclass(frozen=True)
class ShutdownRequest:
    reason: int
    timeout: int
    flags: int
    message: str

    @property
    def reboot(self) -> bool:
        return bool(self.flags & SHUTDOWN_RESTART)

    @property
    def force(self) -> bool:
        return bool(self.flags & SHUTDOWN_FORCE)


def encode_shutdown(*, reboot: bool, force: bool, message: str = "") -> bytes:
    flags = (SHUTDOWN_RESTART if reboot else 0) | (SHUTDOWN_FORCE if force else 0)
    text = message.encode()[: SHUTDOWN.size - 12]
    return SHUTDOWN.pack(REASON_PLANNED, 0, flags, text)


def parse_shutdown(body: bytes) -> ShutdownRequest:
    """A shutdown request; only power off and reboot, each with or without
    force (flags 0..3), are accepted, as Linux accepts them."""
    if len(body) < SHUTDOWN.size:
        raise IcFormatError(f"shutdown body of {len(body)} bytes (at least {SHUTDOWN.size})")
    reason, timeout, flags, raw = SHUTDOWN.unpack_from(body)
    if flags not in (0, 1, 2, 3):
        raise IcFormatError(f"shutdown flags {flags:#x} (power off or reboot, with or without force)")
    return ShutdownRequest(reason, timeout, flags, raw.split(b"\0", 1)[0].decode("utf-8", "replace"))


# -- TIMESYNC (type 4) ------------------------------------------------------------------

WLTIMEDELTA: Final = 116444736000000000  # 100 ns units from 1601-01-01 to 1970-01-01
TIMESYNC_REF: Final = struct.Struct("<QQBBB3x")  # >= 4.0: parenttime, vmreferencetime, flags, leap, stratum
TIMESYNC_OLD: Final = struct.Struct("<QQQB")  # < 4.0: parenttime, childtime, roundtriptime, flags
TIMESYNC_SYNC: Final = 1
TIMESYNC_SAMPLE: Final = 2


@dataclass(frozen=True)
class TimeSample:
    parent_time: int  # host wall clock, 100 ns since 1601
    reference_time: int | None  # partition reference counter when the host read its clock (>= 4.0)
    flags: int


def reference_time() -> int:
    """The partition reference counter, in 100 ns units: the machine's
    monotonic clock, which the host and every guest process read alike
    (the role Hyper-V's reference TSC page plays)."""
    return time.monotonic_ns() // 100


def read_clocks(wall_ns: Callable[[], int] = time.time_ns, tries: int = 8) -> tuple[int, int]:
    """(wall clock in ns, reference counter) read together: the wall clock
    between two reference reads, keeping the tightest pair of ``tries``, so a
    preemption between the two reads (a loaded machine) does not become an
    offset error.  The reference returned is the bracket's midpoint."""
    best: tuple[int, int, int] | None = None
    for _ in range(tries):
        before = time.monotonic_ns()
        wall = wall_ns()
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, wall, (before + after) // 2 // 100)
        if after - before < 20_000:
            break
    assert best is not None
    return best[1], best[2]


def unix_ns_to_wintime(ns: int) -> int:
    return ns // 100 + WLTIMEDELTA


def wintime_to_unix_ns(t: int) -> int:
    return (t - WLTIMEDELTA) * 100


def encode_timesync(parent_time: int, reference_time: int, flags: int) -> bytes:
    return TIMESYNC_REF.pack(parent_time, reference_time, flags, 0, 0)


def parse_timesync(body: bytes, version: Version) -> TimeSample:
    if version >= Version(4, 0):
        if len(body) < TIMESYNC_REF.size:
            raise IcFormatError(f"timesync body of {len(body)} bytes (at least {TIMESYNC_REF.size})")
        parent, reference, flags, _, _ = TIMESYNC_REF.unpack_from(body)
        return TimeSample(parent, reference, flags)
    if len(body) < TIMESYNC_OLD.size:
        raise IcFormatError(f"timesync body of {len(body)} bytes (at least {TIMESYNC_OLD.size})")
    parent, _, _, flags = TIMESYNC_OLD.unpack_from(body)
    return TimeSample(parent, None, flags)


# -- KVP (type 2) -----------------------------------------------------------------------


class KvpOp(enum.IntEnum):
    GET = 0
    SET = 1
    DELETE = 2
    ENUMERATE = 3
    GET_IP_INFO = 4
    SET_IP_INFO = 5


class Pool(enum.IntEnum):
    EXTERNAL = 0  # set by the host, read by the guest
    GUEST = 1  # published by the guest, read by the host
    AUTO = 2
    AUTO_EXTERNAL = 3
    AUTO_INTERNAL = 4  # never exchanged between host and guest


EXCHANGED_POOLS: Final = frozenset({Pool.EXTERNAL, Pool.GUEST, Pool.AUTO, Pool.AUTO_EXTERNAL})


class ValueType(enum.IntEnum):
    STRING = 1  # REG_SZ, UTF-16
    EXPAND_STRING = 2
    DWORD = 4
    QWORD_LINUX = 8  # Linux REG_U64
    QWORD = 11  # Windows REG_QWORD (OpenVMM)


MAX_KEY_BYTES: Final = 512  # UTF-16 including the NUL
MAX_VALUE_BYTES: Final = 2048
KVP_HEADER: Final = struct.Struct("<BBH")  # operation, pool, pad
KVP_VALUE: Final = struct.Struct(f"<III{MAX_KEY_BYTES}s{MAX_VALUE_BYTES}s")  # type, key size, value size: 2572
KVP_INDEX: Final = struct.Struct("<I")
KVP_DELETE: Final = struct.Struct(f"<I{MAX_KEY_BYTES}s")
KVP_BODY_SIZE: Final = KVP_HEADER.size + KVP_INDEX.size + KVP_VALUE.size  # 2580, every request padded to it


def encode_utf16z(text: str, limit: int, what: str) -> bytes:
    """``text`` as UTF-16LE with its NUL; ``ValueError`` past ``limit`` bytes."""
    if "\0" in text:
        raise ValueError(f"KVP {what} contains a NUL character")
    raw = text.encode("utf-16-le", "strict") + b"\0\0"
    if len(raw) > limit:
        raise ValueError(f"KVP {what} of {len(raw)} bytes as UTF-16 (at most {limit} including the NUL)")
    return raw


def decode_utf16z(raw: bytes, size: int, limit: int, what: str) -> str:
    """The string in the first ``size`` bytes of ``raw``: even, within
    ``limit``, NUL-terminated, valid UTF-16 with no NUL inside."""
    if size > limit or size > len(raw):
        raise IcFormatError(f"{what} size {size} (at most {limit})")
    if size < 2 or size % 2:
        raise IcFormatError(f"{what} size {size} is not a NUL-terminated UTF-16 string")
    data = raw[:size]
    if data[-2:] != b"\0\0":
        raise IcFormatError(f"{what} is not NUL-terminated")
    try:
        text = data[:-2].decode("utf-16-le", "strict")
    except UnicodeDecodeError:
        raise IcFormatError(f"{what} is not valid UTF-16") from None
    if "\0" in text:
        raise IcFormatError(f"{what} has a NUL inside")
    return text


@dataclass(frozen=True)
class KvpRequest:
    op: int
    pool: int
    index: int = 0
    key: str = ""
    value: str = ""


def _value_block(key: str, value: str | None) -> bytes:
    k = encode_utf16z(key, MAX_KEY_BYTES, "key")
    v = encode_utf16z(value, MAX_VALUE_BYTES, "value") if value is not None else b""
    return KVP_VALUE.pack(ValueType.STRING, len(k), len(v), k, v)


def encode_kvp(op: int, pool: int, *, key: str = "", value: str | None = None, index: int = 0) -> bytes:
    """A KVP request or answer body (padded to ``KVP_BODY_SIZE``).
    ``ValueError`` for a key or value past the limits."""
    head = KVP_HEADER.pack(op, pool, 0)
    if op == KvpOp.DELETE:
        k = encode_utf16z(key, MAX_KEY_BYTES, "key")
        rest = KVP_DELETE.pack(len(k), k)
    elif op == KvpOp.ENUMERATE:
        rest = KVP_INDEX.pack(index) + (_value_block(key, value) if key else bytes(KVP_VALUE.size))
    else:
        rest = _value_block(key, value)
    return (head + rest).ljust(KVP_BODY_SIZE, b"\0")


def parse_kvp_header(body: bytes) -> tuple[int, int]:
    if len(body) < KVP_HEADER.size:
        raise IcFormatError(f"KVP body of {len(body)} bytes")
    op, pool, _ = KVP_HEADER.unpack_from(body)
    return op, pool


def _parse_value(body: bytes, offset: int, *, want_value: bool) -> tuple[str, str]:
    if len(body) < offset + KVP_VALUE.size:
        raise IcFormatError(f"KVP body of {len(body)} bytes has no value block at {offset}")
    vtype, key_size, value_size, key_raw, value_raw = KVP_VALUE.unpack_from(body, offset)
    key = decode_utf16z(key_raw, key_size, MAX_KEY_BYTES, "key")
    if not want_value:
        return key, ""
    if vtype in (ValueType.STRING, ValueType.EXPAND_STRING):
        value = decode_utf16z(value_raw, value_size, MAX_VALUE_BYTES, "value")
    elif vtype == ValueType.DWORD:
        if value_size != 4:
            raise IcFormatError(f"DWORD value of {value_size} bytes")
        value = str(int.from_bytes(value_raw[:4], "little"))
    elif vtype in (ValueType.QWORD, ValueType.QWORD_LINUX):
        if value_size != 8:
            raise IcFormatError(f"QWORD value of {value_size} bytes")
        value = str(int.from_bytes(value_raw[:8], "little"))
    else:
        raise IcFormatError(f"unknown KVP value type {vtype}")
    return key, value


def parse_kvp_request(body: bytes) -> KvpRequest:
    """A host's KVP request, as the guest reads it (GET carries a key, SET a
    key and value, DELETE a key, ENUMERATE an index)."""
    op, pool = parse_kvp_header(body)
    if op == KvpOp.DELETE:
        if len(body) < KVP_HEADER.size + KVP_DELETE.size:
            raise IcFormatError(f"KVP DELETE body of {len(body)} bytes")
        key_size, key_raw = KVP_DELETE.unpack_from(body, KVP_HEADER.size)
        return KvpRequest(op, pool, key=decode_utf16z(key_raw, key_size, MAX_KEY_BYTES, "key"))
    if op == KvpOp.ENUMERATE:
        if len(body) < KVP_HEADER.size + KVP_INDEX.size:
            raise IcFormatError(f"KVP ENUMERATE body of {len(body)} bytes")
        (index,) = KVP_INDEX.unpack_from(body, KVP_HEADER.size)
        return KvpRequest(op, pool, index=index)
    if op in (KvpOp.GET, KvpOp.SET):
        key, value = _parse_value(body, KVP_HEADER.size, want_value=op == KvpOp.SET)
        return KvpRequest(op, pool, key=key, value=value)
    return KvpRequest(op, pool)  # IP operations and unknown ones: the caller refuses them


def parse_kvp_answer(body: bytes, op: int) -> tuple[str, str]:
    """(key, value) of the guest's answer to a GET or ENUMERATE."""
    got, _ = parse_kvp_header(body)
    if got != op:
        raise IcFormatError(f"KVP answer for operation {got}, asked {op}")
    offset = KVP_HEADER.size + (KVP_INDEX.size if op == KvpOp.ENUMERATE else 0)
    return _parse_value(body, offset, want_value=True)
