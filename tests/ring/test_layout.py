"""Every layout offset and size pinned: C (compiler-decided) == Python == the
published VMBus layout (linux include/linux/hyperv.h, struct hv_ring_buffer
and struct vmpacket_descriptor)."""

from __future__ import annotations

import struct

from ring import _layout as L
from ring._ring_c import ffi, lib


def test_control_page_offsets_match_vmbus() -> None:
    off = lambda f: ffi.offsetof("struct pv_ring_control", f)  # noqa: E731
    assert ffi.sizeof("struct pv_ring_control") == 4096 == L.CONTROL_SIZE
    assert off("write_index") == 0 == L.WRITE_INDEX_OFFSET
    assert off("read_index") == 4 == L.READ_INDEX_OFFSET
    assert off("interrupt_mask") == 8 == L.INTERRUPT_MASK_OFFSET
    assert off("pending_send_sz") == 12 == L.PENDING_SEND_SZ_OFFSET
    assert off("reserved1") == 16
    assert off("feature_bits") == 64 == L.FEATURE_BITS_OFFSET
    assert off("reserved2") == 68


def test_descriptor_layout_matches_vmbus() -> None:
    off = lambda f: ffi.offsetof("struct pv_packet_descriptor", f)  # noqa: E731
    assert ffi.sizeof("struct pv_packet_descriptor") == 16 == L.DESCRIPTOR.size == L.DESCRIPTOR_SIZE
    assert (off("type"), off("offset8"), off("len8"), off("flags"), off("trans_id")) == (0, 2, 4, 6, 8)
    assert L.TRAILER_SIZE == 8


def test_constants_agree_between_c_and_python() -> None:
    assert lib.PV_PKT_DATA_INBAND == L.PacketType.DATA_INBAND == 6
    assert lib.PV_PKT_DATA_USING_XFER_PAGES == L.PacketType.DATA_USING_XFER_PAGES == 7
    assert lib.PV_PKT_DATA_USING_GPA_DIRECT == L.PacketType.DATA_USING_GPA_DIRECT == 9
    assert lib.PV_PKT_COMP == L.PacketType.COMPLETION == 0xB
    assert lib.PV_FLAG_COMPLETION_REQUESTED == L.FLAG_COMPLETION_REQUESTED == 1
    assert lib.PV_FEAT_PENDING_SEND_SZ == L.FEAT_PENDING_SEND_SZ == 1
    assert lib.PV_MAX_LEN8 == L.MAX_LEN8 == 0xFFFF


def test_packet_record_format_matches_the_c_struct() -> None:
    from ring._cring import PV_PACKET

    assert PV_PACKET.size == ffi.sizeof("pv_packet")
    p = ffi.new("pv_packet *", {"type": 0xB, "flags": 1, "header_len": 24, "packet_len": 88,
                                "trans_id": 0x1122334455667788, "ring_offset": 4000})
    assert PV_PACKET.unpack_from(ffi.buffer(p)) == (0xB, 1, 24, 88, 0x1122334455667788, 4000)


def test_gpa_direct_header_bytes() -> None:
    from ring import GpaRange
    from ring._api import encode_gpa_direct_header

    hdr = encode_gpa_direct_header([GpaRange(8192, 0x10, [5, 6, 7])])
    # reserved, range_cnt, then {byte_count, byte_offset, pfn[]}
    assert hdr == struct.pack("<IIIIQQQ", 0, 1, 8192, 0x10, 5, 6, 7)
