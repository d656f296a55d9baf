"""Every control message's size and field offsets, pinned against the VMBus
layouts (reference section 3.4), plus decode's refusals."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus import hv
from vmbus import protocol as P


def offsets(msg: P.Message) -> bytes:
    return msg.encode()


SIZES = {
    P.OfferChannel: 196, P.RescindChannelOffer: 12, P.RequestOffers: 8, P.AllOffersDelivered: 8,
    P.OpenChannel: 148, P.OpenChannelResult: 20, P.CloseChannel: 12, P.GpadlHeader: 20, P.GpadlBody: 16,
    P.GpadlCreated: 20, P.GpadlTeardown: 16, P.GpadlTorndown: 12, P.RelidReleased: 12,
    P.InitiateContact: 40, P.VersionResponse: 16, P.Unload: 8, P.UnloadResponse: 8,
}


@pytest.mark.parametrize(("cls", "size"), SIZES.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_message_sizes(cls: type[P.Message], size: int) -> None:
    assert cls.size() == size
    data = cls().encode()
    assert len(data) == size if cls not in (P.GpadlHeader,) else len(data) == size + 8
    assert struct.unpack_from("<I", data)[0] == cls.TYPE


def test_field_offsets() -> None:
    guid_t, guid_i = uuid.uuid4(), uuid.uuid4()
    offer = P.OfferChannel(if_type=P.guid_to_wire(guid_t), if_instance=P.guid_to_wire(guid_i), chn_flags=0x1234,
                           mmio_megabytes=7, sub_channel_index=3, child_relid=0xAABBCCDD, monitorid=9,
                           monitor_allocated=1, is_dedicated_interrupt=1, connection_id=0x2005).encode()
    assert offer[8:24] == guid_t.bytes_le and offer[24:40] == guid_i.bytes_le
    assert struct.unpack_from("<H", offer, 56)[0] == 0x1234
    assert struct.unpack_from("<H", offer, 58)[0] == 7
    assert struct.unpack_from("<H", offer, 180)[0] == 3
    assert struct.unpack_from("<I", offer, 184)[0] == 0xAABBCCDD
    assert offer[188] == 9 and offer[189] == 1
    assert struct.unpack_from("<H", offer, 190)[0] == 1
    assert struct.unpack_from("<I", offer, 192)[0] == 0x2005

    contact = P.InitiateContact(0x50003, 1, 2, 0x1000, 0x2000).encode()
    assert struct.unpack_from("<IIQQQ", contact, 8) == (0x50003, 1, 2, 0x1000, 0x2000)
    assert contact[16] == 2  # msg_sint at byte 16 for >= 5.0

    resp = P.VersionResponse(1, 2, 0, 4).encode()
    assert resp[8] == 1 and resp[9] == 2 and struct.unpack_from("<I", resp, 12)[0] == 4

    opn = P.OpenChannel(5, 6, 7, 8, 9, b"u" * 120).encode()
    assert struct.unpack_from("<IIIII", opn, 8) == (5, 6, 7, 8, 9) and opn[28:148] == b"u" * 120

    hdr = P.gpadl_messages(3, 0xE1E10, list(range(30)), 30 * 4096, 0)
    head = hdr[0].encode()
    assert struct.unpack_from("<IIHH", head, 8) == (3, 0xE1E10, 8 + 30 * 8, 1)
    assert struct.unpack_from("<II", head, 20) == (30 * 4096, 0)
    assert struct.unpack_from("<26Q", head, 28) == tuple(range(26))
    assert len(head) == 236  # 26 PFNs fit; a 27th would make 244 > 240
    body = hdr[1].encode()
    assert struct.unpack_from("<II4Q", body, 8) == (0, 0xE1E10, 26, 27, 28, 29)

    for cls, fields in ((P.OpenChannelResult, (1, 2, 3)), (P.GpadlCreated, (1, 2, 3)), (P.GpadlTeardown, (1, 2))):
        data = cls(*fields).encode()
        assert struct.unpack_from(f"<{len(fields)}I", data, 8) == fields


def test_gpadl_chunking_capacity() -> None:
    assert P.GPADL_HEADER_PFNS == 26 and P.GPADL_BODY_PFNS == 28
    msgs = P.gpadl_messages(1, 2, list(range(26 + 28 * 3 + 1)), 4096 * (26 + 28 * 3 + 1))
    assert [len(m.pfns) for m in msgs] == [26, 28, 28, 28, 1]
    assert all(len(m.encode()) <= 240 for m in msgs)


def test_hypercall_abi() -> None:
    assert hv.control_word(0x5C) == 0x5C
    assert hv.control_word(0x5D, fast=True) == 0x1005D
    assert hv.split_control_word(hv.control_word(0x5C, rep_count=5)) == (0x5C, False, 5)
    assert hv.POST_MESSAGE_INPUT.size == 256
    assert hv.SYNIC_MESSAGE_HEADER.size == 16


def test_decode_refusals() -> None:
    with pytest.raises(P.ProtocolError, match="shorter"):
        P.decode(b"\x01\x00")
    with pytest.raises(P.ProtocolError, match="unknown"):
        P.decode(struct.pack("<II", 0, 0))
    with pytest.raises(P.ProtocolError, match="truncated"):
        P.decode(P.OfferChannel().encode()[:100])
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode(bytes(241))
    with pytest.raises(P.ProtocolError, match="ranges"):
        P.decode(P.GpadlHeader(1, 2, 16, 2, 4096, 0, (1,)).encode())


@given(st.binary(max_size=300))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    try:
        msg = P.decode(data)
    except P.ProtocolError:
        return
    assert isinstance(msg, P.Message)
