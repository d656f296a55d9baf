"""Sockets-device messages: ``vmbus.protocols.hvsock``, the parser layer.

An input is a selector byte and one message from the guest: a connect
request on the control channel (``parse_connect_request``, as the host's
``SocketsHost`` reads it), a pipe-mode packet of a connection with its
packet type (``parse_pipe_packet``, as both relays read it), a connect
result (the guest's reader), a socket offer's fields (``parse_offer``) or
a host program's ``CONNECT`` line.  The parser layer only: past the
parsers the host's code is socket plumbing (a connect request starts a
connection to a host service), which is no cheap per-input rig.

Invariants: ``parse_pipe_packet`` raises only ``PipeError`` and the other
parsers nothing (they answer None); an accepted pipe packet's data is the
payload's bytes after the header, at most 16 KiB, and its header re-encodes
to the payload's; an accepted connect request or result re-encodes to the
bytes it came from (up to the pad word); an accepted offer names a port.
"""

from __future__ import annotations

import uuid

from fuzz.rig import Input, Script, check
from ring import PacketType
from vmbus.protocols import hvsock as H

CONNECT, PIPE, RESULT, OFFER, LINE = range(5)
PACKET_TYPES = (PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT, PacketType.COMPLETION,
                PacketType.DATA_USING_XFER_PAGES)


def without_pad(raw: bytes) -> bytes:
    return raw[:4] + bytes(4) + raw[8:]


def connect_request(payload: bytes) -> None:
    request = H.parse_connect_request(payload)
    if request is None:
        return
    check(len(payload) >= H.CONNECT_REQUEST.size, "accepted a short connect request")
    check(request.encode() == without_pad(payload[: H.CONNECT_REQUEST.size]), f"{request} does not re-encode")
    result = H.connect_result(request, H.STATUS_CONNECTION_REFUSED)
    check(H.parse_connect_result(result) == (request.endpoint, H.STATUS_CONNECTION_REFUSED), "result round trip")


def pipe_packet(ptype: int, payload: bytes) -> None:
    try:
        data = H.parse_pipe_packet(ptype, payload)
    except H.PipeError:
        return
    _, size = H.PIPE_HEADER.unpack_from(payload)
    check(ptype == PacketType.DATA_INBAND and len(data) == size <= H.MAX_PIPE_DATA, f"{len(data)} of {size} bytes")
    check(H.PIPE_HEADER.size + size <= len(payload), "pipe data past the payload")
    check(H.pipe_header(len(data)) + bytes(data) == payload[: H.PIPE_HEADER.size + size], "pipe packet re-encodes")


def connect_result(payload: bytes) -> None:
    got = H.parse_connect_result(payload)
    if got is None:
        return
    endpoint, status = got
    service = uuid.UUID(bytes_le=payload[24:40])
    again = H.connect_result(H.ConnectRequest(endpoint, service), status)
    check(again == without_pad(payload[: H.CONNECT_RESULT.size]), f"result {got} does not re-encode")


def offer(inp: Input) -> None:
    flags, if_type, if_instance = inp.u16(), inp.take(16).ljust(16, b"\0"), inp.take(16).ljust(16, b"\0")
    area = inp.take(120)
    got = H.parse_offer(flags, if_type, if_instance, area)
    if got is None:
        return
    check(got.port is not None and H.port_to_guid(got.port) == got.service, f"offer {got} names no port")
    check(got.service.bytes_le == if_type and got.endpoint.bytes_le == if_instance, f"offer {got} GUIDs")


def connect_line(line: bytes) -> None:
    service = H.parse_connect_line(line[: H.MAX_CONNECT_LINE])
    if service is not None:
        port = H.guid_to_port(service)
        check(port is None or H.port_to_guid(port) == service, f"port {port} of {service}")


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    which = inp.u8() % 5
    if which == CONNECT:
        connect_request(inp.take(len(data)))
    elif which == PIPE:
        ptype = inp.u8()
        pipe_packet(PACKET_TYPES[ptype % 4] if ptype < 0xF0 else inp.u16(), inp.take(len(data)))
    elif which == RESULT:
        connect_result(inp.take(len(data)))
    elif which == OFFER:
        offer(inp)
    else:
        connect_line(inp.take(len(data)))


def seeds() -> list[bytes]:
    endpoint, service = uuid.UUID(int=0x1234), H.port_to_guid(5000)
    request = H.ConnectRequest(endpoint, service)
    return [
        Script().u8(CONNECT).raw(request.encode()).data(),
        Script().u8(PIPE).u8(0).raw(H.pipe_header(5) + b"hello").data(),
        Script().u8(PIPE).u8(0).raw(H.pipe_header(0)).data(),  # the FIN
        Script().u8(RESULT).raw(H.connect_result(request, H.STATUS_SUCCESS)).data(),
        Script().u8(OFFER).u16(H.OFFER_FLAGS).raw(service.bytes_le).raw(endpoint.bytes_le)
        .raw(H.user_defined(True)).data(),
        Script().u8(LINE).raw(b"CONNECT 5000\n").data(),
        Script().u8(LINE).raw(f"connect {service}\n".encode()).data(),
    ]
