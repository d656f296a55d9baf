"""Integration-service messages: ``vmbus.protocols.ic``, the parser layer.

An input is one IC packet payload (pipe header, ICMSG header, body) as a
guest puts it on an IC channel.  It goes through ``parse_message`` and,
when accepted, its body through the parser the host uses for the guest's
answer of that message type (``parse_negotiate_answer``,
``parse_heartbeat``, ``parse_kvp_answer``) and, for coverage of the
same byte layouts, the guest's readers (``choose_versions``,
``parse_negotiate``, ``parse_shutdown``, ``parse_timesync``,
``parse_kvp_request``).  The parser layer only: the host side
(``host_drivers.ic``) keeps no state beyond a pending transaction and
calls exactly these functions on a guest's answer, so driving it through
a channel would add ring work per input and no parsing.

Invariants: only ``IcFormatError`` escapes; an accepted message's body is
exactly ``icmsgsize`` bytes inside the payload, and re-encoding the message
gives the payload's bytes (up to the reserved word and a longer pipe
``msgsize``, which the encoder does not write); version counts stay within
100 and inside the body, and a negotiate list re-encodes to the body's
bytes; decoded KVP keys and values re-encode to the bytes they came from.
"""

from __future__ import annotations

import struct

from fuzz.rig import check
from vmbus.protocols import ic

HOST_OFFERS = (ic.HEARTBEAT_VERSIONS, ic.SHUTDOWN_VERSIONS, ic.TIMESYNC_VERSIONS, ic.KVP_VERSIONS)


def check_message(payload: bytes, msg: ic.IcMessage) -> None:
    _, msgsize = ic.PIPE_HEADER.unpack_from(payload)
    size = ic.ICMSG_HEADER.unpack_from(payload, ic.PIPE_HEADER.size)[5]
    check(len(msg.body) == size and ic.HEADER_SIZE + size <= len(payload), f"body of {len(msg.body)}, icmsgsize {size}")
    check(msg.body == payload[ic.HEADER_SIZE : ic.HEADER_SIZE + size], "body is not the payload's bytes")
    again = ic.encode_message(msg.msgtype, msg.body, framework=msg.framework, version=msg.version,
                              status=msg.status, flags=msg.flags, transaction_id=msg.transaction_id)
    expected = bytearray(payload[: ic.HEADER_SIZE + size])
    struct.pack_into("<I", expected, 4, ic.ICMSG_HEADER.size + size)  # msgsize as the encoder writes it
    expected[ic.HEADER_SIZE - 2 : ic.HEADER_SIZE] = b"\0\0"  # the reserved word
    check(again == bytes(expected), f"{msg} re-encodes as {again.hex()}")
    check(ic.parse_message(again) == msg, f"{msg} does not survive a round trip")
    check(msgsize >= ic.ICMSG_HEADER.size + size, "accepted an icmsgsize past msgsize")


def check_negotiate(body: bytes) -> None:
    try:
        frameworks, versions = ic.parse_negotiate(body)
    except ic.IcFormatError:
        return
    n = len(frameworks) + len(versions)
    check(len(frameworks) <= ic.MAX_VERSION_COUNT and len(versions) <= ic.MAX_VERSION_COUNT, "too many versions")
    check(ic.NEGOTIATE_HEAD.size + ic.VERSION.size * n <= len(body), "versions past the body")
    again = ic.encode_negotiate(tuple(frameworks), tuple(versions))
    check(again[:4] == body[:4] and again[8:] == body[8 : 8 + len(again) - 8], "negotiate does not re-encode")
    for offered, preferred in HOST_OFFERS:
        try:
            pick = ic.parse_negotiate_answer(body, ic.FRAMEWORK_VERSIONS_HOST, offered)
        except ic.IcFormatError:
            pass
        else:
            check(pick[0] in ic.FRAMEWORK_VERSIONS_HOST and pick[1] in offered, f"accepted a pick {pick} not offered")
        choice = ic.choose_versions(ic.FRAMEWORK_VERSIONS_GUEST, preferred, body)
        check(choice is None or (choice[0] in frameworks and choice[1] in versions), f"chose {choice}")


def check_utf16(text: str, raw: bytes) -> None:
    check(text.encode("utf-16-le") + b"\0\0" == raw, f"{text!r} does not re-encode to {raw.hex()}")


def check_kvp(body: bytes) -> None:
    for op in (ic.KvpOp.GET, ic.KvpOp.ENUMERATE):
        try:
            key, value = ic.parse_kvp_answer(body, op)
        except ic.IcFormatError:
            continue
        offset = ic.KVP_HEADER.size + (ic.KVP_INDEX.size if op == ic.KvpOp.ENUMERATE else 0)
        vtype, key_size, value_size, key_raw, value_raw = ic.KVP_VALUE.unpack_from(body, offset)
        check(key_size <= ic.MAX_KEY_BYTES and value_size <= ic.MAX_VALUE_BYTES, "KVP sizes past their limits")
        check_utf16(key, key_raw[:key_size])
        if vtype in (ic.ValueType.STRING, ic.ValueType.EXPAND_STRING):
            check_utf16(value, value_raw[:value_size])
        else:
            check(int(value) == int.from_bytes(value_raw[:value_size], "little"), f"number {value}")
    try:
        request = ic.parse_kvp_request(body)
    except ic.IcFormatError:
        return
    if request.key:
        check(len(request.key.encode("utf-16-le")) + 2 <= ic.MAX_KEY_BYTES, "KVP key past its limit")


def check_body(msg: ic.IcMessage) -> None:
    body = msg.body
    if msg.msgtype == ic.MsgType.NEGOTIATE:
        check_negotiate(body)
    elif msg.msgtype == ic.MsgType.HEARTBEAT:
        try:
            seq = ic.parse_heartbeat(body)
        except ic.IcFormatError:
            return
        check(seq == int.from_bytes(body[:8], "little"), "heartbeat sequence")
        answer = ic.heartbeat_answer(body)
        check(len(answer) == len(body) and answer[8:] == body[8:], "heartbeat answer changed the body")
    elif msg.msgtype == ic.MsgType.SHUTDOWN:
        try:
            request = ic.parse_shutdown(body)
        except ic.IcFormatError:
            return
        check(request.flags in (0, 1, 2, 3) and "\0" not in request.message, f"accepted {request}")
    elif msg.msgtype == ic.MsgType.TIMESYNC:
        try:
            sample = ic.parse_timesync(body, msg.version)
        except ic.IcFormatError:
            return
        check(sample.parent_time == int.from_bytes(body[:8], "little"), "timesync parent time")
    elif msg.msgtype == ic.MsgType.KVP:
        check_kvp(body)


def test_one_input(data: bytes) -> None:
    try:
        msg = ic.parse_message(data)
    except ic.IcFormatError:
        return
    check_message(data, msg)
    check_body(msg)


def seeds() -> list[bytes]:
    """Every message type, as the host sends it and as the guest answers."""
    fw, v3, v4 = ic.Version(3, 0), ic.Version(3, 0), ic.Version(4, 0)
    answer = {"flags": ic.RESPONSE_FLAGS, "framework": fw, "transaction_id": 7}
    bodies = [
        (ic.MsgType.NEGOTIATE, ic.encode_negotiate(ic.FRAMEWORK_VERSIONS_HOST, ic.KVP_VERSIONS[0]), {}),
        (ic.MsgType.NEGOTIATE, ic.negotiate_answer((fw, v3)), answer),
        (ic.MsgType.NEGOTIATE, ic.negotiate_answer(None), answer),
        (ic.MsgType.HEARTBEAT, ic.HEARTBEAT.pack(41), {}),
        (ic.MsgType.HEARTBEAT, ic.heartbeat_answer(ic.HEARTBEAT.pack(41)), answer),
        (ic.MsgType.SHUTDOWN, ic.encode_shutdown(reboot=True, force=False, message="bye"), {}),
        (ic.MsgType.TIMESYNC, ic.encode_timesync(ic.WLTIMEDELTA + 10**9, 12345, ic.TIMESYNC_SAMPLE),
         {"version": v4}),
        (ic.MsgType.TIMESYNC, ic.TIMESYNC_OLD.pack(ic.WLTIMEDELTA, 0, 0, ic.TIMESYNC_SYNC), {"version": v3}),
        (ic.MsgType.KVP, ic.encode_kvp(ic.KvpOp.GET, ic.Pool.GUEST, key="HostName"), {}),
        (ic.MsgType.KVP, ic.encode_kvp(ic.KvpOp.GET, ic.Pool.GUEST, key="HostName", value="guest"), answer),
        (ic.MsgType.KVP, ic.encode_kvp(ic.KvpOp.ENUMERATE, ic.Pool.AUTO, key="OSName", value="Linux", index=2),
         answer),
        (ic.MsgType.KVP, ic.encode_kvp(ic.KvpOp.SET, ic.Pool.EXTERNAL, key="k", value="v"), {}),
        (ic.MsgType.KVP, ic.encode_kvp(ic.KvpOp.DELETE, ic.Pool.EXTERNAL, key="k"), {}),
    ]
    return [ic.encode_message(mtype, body, **kwargs) for mtype, body, kwargs in bodies]
