"""The IC wire format against the reference's byte layouts, negotiation picks,
and hostile bodies (every failure an ``IcFormatError``, nothing else)."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus.protocols import ic

V = ic.Version


def test_constants_are_the_references() -> None:
    """GUIDs (vmbus-reference.md 5), message types, flags, statuses, limits (ic-reference.md 2-7)."""
    assert ic.HEARTBEAT_ID == uuid.UUID("57164f39-9115-4e78-ab55-382f3bd5422d")
    assert ic.SHUTDOWN_ID == uuid.UUID("0e0b6031-5213-4934-818b-38d90ced39db")
    assert ic.TIMESYNC_ID == uuid.UUID("9527e630-d0ae-497b-adce-e80ab0175caf")
    assert ic.KVP_ID == uuid.UUID("a9a0f4e7-5a45-4d96-b827-8a841e8c03e6")
    assert [int(t) for t in ic.MsgType] == [0, 1, 2, 3, 4]
    assert (int(ic.Flag.TRANSACTION), int(ic.Flag.REQUEST), int(ic.Flag.RESPONSE)) == (1, 2, 4)
    assert ic.Status.FAIL == 0x80004005 and ic.Status.NO_MORE_ITEMS == 0x80070103
    assert ic.Status.NOT_SUPPORTED == 0x80070032 and ic.Status.NOT_FOUND == 0x80041002
    assert ic.Status.INVALID_ARG == 0x80070057 and ic.Status.DISK_FULL == 0x80070070
    assert ic.HEADER_SIZE == 28 and ic.ICMSG_HEADER.size == 20
    assert ic.MAX_VERSION_COUNT == 100
    assert ic.WLTIMEDELTA == 116444736000000000
    assert (ic.MAX_KEY_BYTES, ic.MAX_VALUE_BYTES) == (512, 2048)
    assert (ic.SHUTDOWN_FORCE, ic.SHUTDOWN_RESTART, ic.SHUTDOWN_HIBERNATE) == (1, 2, 4)
    assert (ic.TIMESYNC_SYNC, ic.TIMESYNC_SAMPLE) == (1, 2)
    assert [int(p) for p in ic.Pool] == [0, 1, 2, 3, 4]
    assert [int(o) for o in ic.KvpOp] == [0, 1, 2, 3, 4, 5]


def test_header_layout_field_by_field() -> None:
    msg = ic.encode_message(ic.MsgType.SHUTDOWN, b"\xaa" * 12, framework=V(3, 0), version=V(3, 2),
                            status=0x80004005, flags=ic.RESPONSE_FLAGS, transaction_id=0x5A)
    u16 = lambda off: struct.unpack_from("<H", msg, off)[0]  # noqa: E731
    u32 = lambda off: struct.unpack_from("<I", msg, off)[0]  # noqa: E731
    assert u32(0) == 1  # pipe flags DATA
    assert u32(4) == 20 + 12  # pipe msgsize: bytes after the pipe header
    assert (u16(8), u16(10)) == (3, 0)  # icverframe
    assert u16(12) == 3  # icmsgtype
    assert (u16(14), u16(16)) == (3, 2)  # icvermsg
    assert u16(18) == 12  # icmsgsize
    assert u32(20) == 0x80004005
    assert msg[24] == 0x5A and msg[25] == 5 and msg[26:28] == b"\0\0"
    assert msg[28:] == b"\xaa" * 12
    parsed = ic.parse_message(msg + b"\0" * 4)  # ring padding after the message is ignored
    assert (parsed.framework, parsed.msgtype, parsed.version, parsed.status) == (V(3, 0), 3, V(3, 2), 0x80004005)
    assert parsed.transaction_id == 0x5A and parsed.is_response and not parsed.is_request
    assert parsed.body == b"\xaa" * 12


def test_body_layouts() -> None:
    # Negotiate: u16 F, u16 M, u32 reserved, then F + M {u16 major, u16 minor}
    body = ic.encode_negotiate((V(1, 0), V(3, 0)), (V(3, 1),))
    assert body == struct.pack("<HHI", 2, 1, 0) + struct.pack("<HHHHHH", 1, 0, 3, 0, 3, 1)
    assert len(ic.negotiate_answer((V(3, 0), V(4, 0)))) == 0x10  # Linux sets icmsgsize = 0x10
    assert ic.negotiate_answer(None) == struct.pack("<HHI", 0, 0, 0)
    # Heartbeat (Linux): u64 seq + u32 reserved[8]
    assert ic.HEARTBEAT.size == 40 and ic.HEARTBEAT.pack(7)[:8] == struct.pack("<Q", 7)
    assert ic.heartbeat_answer(ic.HEARTBEAT.pack(41))[:8] == struct.pack("<Q", 42)
    # Shutdown: reason@0, timeout@4, flags@8, message[2048]@12
    sd = ic.encode_shutdown(reboot=True, force=True, message="bye")
    assert len(sd) == 2060 and struct.unpack_from("<III", sd) == (0x80000000, 0, 3) and sd[12:15] == b"bye"
    # Timesync >= 4.0: parenttime@0, vmreferencetime@8, flags@16, leap@17, stratum@18
    ts = ic.encode_timesync(0x1122334455667788, 0x99, ic.TIMESYNC_SAMPLE)
    assert len(ts) == 22 and struct.unpack_from("<QQB", ts) == (0x1122334455667788, 0x99, 2)
    # KVP: header {u8 op, u8 pool, u16 pad}; value block {type, key_size, value_size, key[512]@12, value[2048]@524}
    assert ic.KVP_VALUE.size == 2572 and ic.KVP_BODY_SIZE == 2580
    kv = ic.encode_kvp(ic.KvpOp.SET, ic.Pool.EXTERNAL, key="ab", value="xyz")
    assert len(kv) == 2580 and kv[:4] == bytes([1, 0, 0, 0])
    assert struct.unpack_from("<III", kv, 4) == (1, 6, 8)  # REG_SZ, sizes in bytes with the UTF-16 NUL
    assert kv[4 + 12 : 4 + 18] == "ab\0".encode("utf-16-le")
    assert kv[4 + 524 : 4 + 532] == "xyz\0".encode("utf-16-le")
    de = ic.encode_kvp(ic.KvpOp.DELETE, ic.Pool.GUEST, key="k")
    assert de[:2] == bytes([2, 1]) and struct.unpack_from("<I", de, 4)[0] == 4 and de[8:12] == "k\0".encode("utf-16-le")
    en = ic.encode_kvp(ic.KvpOp.ENUMERATE, ic.Pool.GUEST, index=9, key="k", value="v")
    assert struct.unpack_from("<I", en, 4)[0] == 9 and struct.unpack_from("<III", en, 8) == (1, 4, 4)


def test_time_conversion() -> None:
    assert ic.unix_ns_to_wintime(0) == ic.WLTIMEDELTA
    assert ic.wintime_to_unix_ns(ic.unix_ns_to_wintime(1_700_000_000_123_456_700)) == 1_700_000_000_123_456_700


# -- negotiation -------------------------------------------------------------------------


@pytest.mark.parametrize(("host_frames", "host_versions", "expected"), [
    ((V(1, 0), V(3, 0)), (V(1, 0), V(3, 0), V(3, 1), V(3, 2)), (V(3, 0), V(3, 2))),  # the newest we both speak
    ((V(1, 0),), (V(3, 0), V(1, 0)), (V(1, 0), V(3, 0))),  # host order does not matter, the guest's does
    ((V(3, 0),), (V(9, 9),), None),  # no common service version
    ((V(2, 0),), (V(3, 0),), None),  # no common framework version
])
def test_guest_picks_from_its_own_preference_order(host_frames: tuple[ic.Version, ...],
                                                   host_versions: tuple[ic.Version, ...],
                                                   expected: tuple[ic.Version, ic.Version] | None) -> None:
    body = ic.encode_negotiate(host_frames, host_versions)
    assert ic.choose_versions(ic.FRAMEWORK_VERSIONS_GUEST, ic.SHUTDOWN_VERSIONS[1], body) == expected


def test_negotiation_counts_are_capped_and_checked_against_the_bytes() -> None:
    over = struct.pack("<HHI", 101, 1, 0) + b"\0\0\x03\0" * 102
    assert ic.choose_versions(ic.FRAMEWORK_VERSIONS_GUEST, ic.KVP_VERSIONS[1], over) is None
    short = struct.pack("<HHI", 2, 2, 0) + struct.pack("<HH", 3, 0)  # claims 4 versions, carries 1
    assert ic.choose_versions(ic.FRAMEWORK_VERSIONS_GUEST, ic.KVP_VERSIONS[1], short) is None
    with pytest.raises(ic.IcFormatError, match="at most 100"):
        ic.parse_negotiate(struct.pack("<HHI", 1, 100 + 1, 0))
    with pytest.raises(ic.IcFormatError):
        ic.parse_negotiate(b"\x01\x00")


def test_host_checks_the_guest_pick_against_what_it_offered() -> None:
    offered = ((V(1, 0), V(3, 0)), (V(3, 0), V(4, 0)))
    ok = ic.negotiate_answer((V(3, 0), V(4, 0)))
    assert ic.parse_negotiate_answer(ok, *offered) == (V(3, 0), V(4, 0))
    with pytest.raises(ic.IcFormatError, match="no version"):
        ic.parse_negotiate_answer(ic.negotiate_answer(None), *offered)
    with pytest.raises(ic.IcFormatError, match="did not offer"):
        ic.parse_negotiate_answer(ic.negotiate_answer((V(3, 0), V(5, 0))), *offered)
    with pytest.raises(ic.IcFormatError, match="not 1/1"):
        ic.parse_negotiate_answer(ic.encode_negotiate((V(3, 0), V(1, 0)), (V(4, 0),)), *offered)


# -- hostile messages ---------------------------------------------------------------------


def test_lengths_are_never_trusted() -> None:
    good = ic.encode_message(ic.MsgType.HEARTBEAT, ic.HEARTBEAT.pack(1))
    for n in range(ic.HEADER_SIZE):
        with pytest.raises(ic.IcFormatError):
            ic.parse_message(good[:n])
    lying_size = good[:18] + struct.pack("<H", 41) + good[20:]  # icmsgsize 41, 40 bytes present
    with pytest.raises(ic.IcFormatError, match="icmsgsize"):
        ic.parse_message(lying_size)
    with pytest.raises(ic.IcFormatError, match="msgsize"):
        ic.parse_message(good[:-1])  # the pipe header claims one byte more than is there
    lying_pipe = struct.pack("<II", 1, 4000) + good[8:]
    with pytest.raises(ic.IcFormatError, match="msgsize"):
        ic.parse_message(lying_pipe)
    with pytest.raises(ic.IcFormatError, match="DATA"):
        ic.parse_message(struct.pack("<II", 2, len(good) - 8) + good[8:])
    with pytest.raises(ic.IcFormatError, match="at most"):
        ic.parse_message(good + bytes(ic.MAX_MESSAGE))


def test_bodies_too_short_for_their_type() -> None:
    with pytest.raises(ic.IcFormatError):
        ic.parse_heartbeat(b"\1" * 7)
    assert ic.parse_heartbeat(b"\1" + b"\0" * 7) == 1  # the sequence alone is enough (Linux)
    with pytest.raises(ic.IcFormatError):
        ic.parse_shutdown(bytes(2059))
    with pytest.raises(ic.IcFormatError):
        ic.parse_timesync(bytes(21), V(4, 0))
    with pytest.raises(ic.IcFormatError):
        ic.parse_timesync(bytes(24), V(3, 0))
    with pytest.raises(ic.IcFormatError):
        ic.parse_kvp_request(bytes([0, 0, 0, 0]) + bytes(100))  # GET without its value block


@pytest.mark.parametrize("flags", [4, 5, 6, 8, 0xFFFFFFFF])
def test_shutdown_accepts_only_power_off_and_reboot(flags: int) -> None:
    with pytest.raises(ic.IcFormatError):
        ic.parse_shutdown(struct.pack("<III", 0, 0, flags) + bytes(2048))


def _kvp_value(vtype: int, key_size: int, key: bytes, value_size: int, value: bytes) -> bytes:
    return bytes([ic.KvpOp.SET, 0, 0, 0]) + ic.KVP_VALUE.pack(vtype, key_size, value_size, key, value)


@pytest.mark.parametrize(("body", "why"), [
    (_kvp_value(1, 514, b"a\0" * 256, 2, b"\0\0"), "key size 514"),
    (_kvp_value(1, 4, b"a\0\0\0", 2050, b"\0\0"), "value size 2050"),
    (_kvp_value(1, 3, b"a\0\0", 2, b"\0\0"), "not a NUL-terminated"),
    (_kvp_value(1, 4, b"a\0b\0", 2, b"\0\0"), "not NUL-terminated"),
    (_kvp_value(1, 6, b"a\0\0\0b\0", 2, b"\0\0"), "not NUL-terminated"),
    (_kvp_value(1, 6, b"\x00\xd8a\0\0\0", 2, b"\0\0"), "not valid UTF-16"),  # a lone surrogate
    (_kvp_value(1, 6, b"a\0\0\0\0\0", 2, b"\0\0"), "NUL inside"),
    (_kvp_value(4, 4, b"a\0\0\0", 3, b"\1\2\3"), "DWORD"),
    (_kvp_value(11, 4, b"a\0\0\0", 4, b"\1\2\3\4"), "QWORD"),
    (_kvp_value(99, 4, b"a\0\0\0", 2, b"\0\0"), "value type 99"),
])
def test_kvp_fields_are_checked(body: bytes, why: str) -> None:
    with pytest.raises(ic.IcFormatError, match=why):
        ic.parse_kvp_request(body)


def test_kvp_limits_on_encoding_and_numbers_as_strings() -> None:
    assert len(ic.encode_utf16z("k" * 255, ic.MAX_KEY_BYTES, "key")) == 512
    with pytest.raises(ValueError, match="at most 512"):
        ic.encode_kvp(ic.KvpOp.SET, 0, key="k" * 256, value="v")
    with pytest.raises(ValueError, match="at most 2048"):
        ic.encode_kvp(ic.KvpOp.SET, 0, key="k", value="v" * 1024)
    with pytest.raises(ValueError, match="NUL"):
        ic.encode_kvp(ic.KvpOp.SET, 0, key="a\0b", value="v")
    dword = _kvp_value(4, 4, b"n\0\0\0", 4, struct.pack("<I", 123456))
    assert ic.parse_kvp_request(dword).value == "123456"
    qword = _kvp_value(8, 4, b"n\0\0\0", 8, struct.pack("<Q", 1 << 40))
    assert ic.parse_kvp_request(qword).value == str(1 << 40)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_parse_or_are_refused_in_words(data: bytes) -> None:
    for parse in (ic.parse_message, ic.parse_kvp_request, ic.parse_negotiate, ic.parse_shutdown, ic.parse_heartbeat):
        try:
            parse(data)
        except ic.IcFormatError as exc:
            assert str(exc)
    for op in (ic.KvpOp.GET, ic.KvpOp.ENUMERATE):
        try:
            ic.parse_kvp_answer(data, op)
        except ic.IcFormatError:
            pass
