"""Ring behaviour, run against the C core and the Python reference alike:
byte layout of written packets, wrap-around at every position, full and
empty edges, and the signalling rules of VMBus (reference sections 1.3-1.7)."""

from __future__ import annotations

import struct

import pytest

from ring import GpaRange, PacketTooLarge, PacketType, RingFull
from ring import _layout as L

from .helpers import IMPLS, control, make_pair, payload_of

impls = pytest.mark.parametrize("impl", ["c", "py"])


@impls
def test_packet_bytes_in_ring(impl: str) -> None:
    out, inc, mem = make_pair(impl)
    out.write([b"abc", b"defgh", b"ij"], trans_id=0x1122334455667788, completion_requested=True)
    assert out.commit() is True
    data = bytes(mem[4096:])
    # descriptor: type 6, offset8 2, len8 (16 + 16)/8 = 4, flags 1, trans_id
    assert struct.unpack_from("<HHHHQ", data, 0) == (6, 2, 4, 1, 0x1122334455667788)
    assert data[16:26] == b"abcdefghij"
    assert data[26:32] == bytes(6)  # zero padding to 8
    assert struct.unpack_from("<Q", data, 32)[0] == 0 << 32  # trailer: start offset 0
    assert control(mem)["write"] == 40
    out.write(b"x" * 8)
    out.commit()
    assert struct.unpack_from("<Q", bytes(mem[4096:]), 40 + 24)[0] == 40 << 32
    assert control(mem)["features"] == 1


@impls
def test_completion_and_gpa_direct_round_trip(impl: str) -> None:
    out, inc, mem = make_pair(impl)
    out.write_completion(99, b"status!!")
    ranges = [GpaRange(4096 * 2 - 100, 100, [10, 11]), GpaRange(512, 0, [42])]
    out.write_gpa_direct(ranges, b"vstor-request-64", trans_id=5)
    out.commit()
    comp = inc.read_packet()
    gpa = inc.read_packet()
    assert inc.read_packet() is None
    assert (comp.type, comp.trans_id, bytes(comp.payload), bytes(comp.header)) == (0xB, 99, b"status!!", b"")
    assert gpa.type == PacketType.DATA_USING_GPA_DIRECT and gpa.completion_requested
    assert bytes(gpa.header) == struct.pack("<IIIIQQIIQ", 0, 2, 8092, 100, 10, 11, 512, 0, 42)
    assert bytes(gpa.payload) == b"vstor-request-64"


@impls
@pytest.mark.parametrize("payload_len", [1, 8, 24, 57, 200])
def test_wraparound_at_every_position(impl: str, payload_len: int) -> None:
    """Start the ring at every 8-aligned offset of the last 256 bytes, so that
    descriptor, payload and trailer each cross the end in some run."""
    size = 4096
    for start in range(size - 256, size, 8):
        out, inc, mem = make_pair(impl, size, start=start)
        sent = [payload_of(start + k, payload_len) for k in range(3)]
        for k, p in enumerate(sent):
            out.write(p, trans_id=k + 1)
        out.commit()
        got = [(pkt.trans_id, bytes(pkt.payload)[:payload_len]) for pkt in inc]
        assert got == [(k + 1, p) for k, p in enumerate(sent)], f"start={start}"
        inc.commit()
        per_packet = 16 + L.pad8(payload_len) + 8
        assert control(mem)["read"] == control(mem)["write"] == (start + 3 * per_packet) % size


@impls
def test_full_and_empty_edges(impl: str) -> None:
    size = 4096
    out, inc, mem = make_pair(impl, size)
    assert inc.read_packet() is None and inc.available == 0
    # 64-byte packets (16 desc + 40 payload + 8 trailer): 4096/64 = 64 would
    # fill the ring exactly, which is forbidden, so 63 fit.
    for k in range(63):
        out.write(b"p" * 40, trans_id=k)
    with pytest.raises(RingFull) as info:
        out.write(b"p" * 40)
    assert info.value.needed == 63 * 64 + 64  # staged bytes + this packet
    assert out.write_space == 64  # exactly the packet: still refused (avail must exceed it)
    out.write(b"q" * 32)  # 56 bytes < 64 free: fits, leaving 8
    assert out.write_space == 8
    out.commit()
    assert inc.available == size - 8
    assert sum(1 for _ in inc) == 64
    inc.commit()
    assert inc.read_packet() is None


@impls
def test_too_large_is_refused_at_once(impl: str) -> None:
    out, inc, mem = make_pair(impl, 4096)
    assert out.max_packet_total == 4088
    out.write(b"z" * out.max_inband_payload)  # the largest ever possible fits an empty ring
    out.revert()
    with pytest.raises(PacketTooLarge):
        out.write(b"z" * (out.max_inband_payload + 1))
    with pytest.raises(PacketTooLarge):
        out.arm_pending_send(4089)


@impls
def test_batch_costs_one_signal(impl: str) -> None:
    out, inc, mem = make_pair(impl, 16384)
    for k in range(50):
        out.write(b"m" * 64, trans_id=k)
    assert out.commit() is True  # empty -> non-empty: signal once
    for _ in range(50):
        out.write(b"m" * 64)
    assert out.commit() is False  # reader has not caught up: it will see these
    assert out.commit() is False  # nothing staged
    assert out.statistics().signals == 1 and out.statistics().commits == 2


@impls
def test_mask_unmask_recheck(impl: str) -> None:
    out, inc, mem = make_pair(impl)
    inc.mask()
    assert control(mem)["mask"] == 1
    out.write(b"while masked")
    assert out.commit() is False  # masked: no signal...
    assert inc.unmask() is True  # ...so the re-check must find the data
    assert control(mem)["mask"] == 0
    list(inc)
    inc.commit()
    assert inc.unmask() is False
    out.write(b"after")
    assert out.commit() is True


@impls
def test_pending_send_transition_exact_fit(impl: str) -> None:
    """Section 1.7: signal only when free space goes from <= pending to > pending."""
    size = 4096
    out, inc, mem = make_pair(impl, size)
    for k in range(63):  # 63 x 64 bytes: 64 left
        out.write(b"p" * 40, trans_id=k)
    out.commit()
    with pytest.raises(RingFull) as info:
        out.write(b"B" * 96)  # 16 + 96 + 8 = 120 bytes
    assert info.value.needed == 120
    assert out.arm_pending_send(120) is False
    assert control(mem)["pending"] == 120
    # Reading one packet frees 64: free = 128 > 120 -> signal.
    # First read none: no commit change. Then check an exact fit with a
    # pending value of 128.
    out.clear_pending_send()
    assert out.arm_pending_send(128) is False
    inc.read_packet()
    assert inc.commit() is False  # free 128 == pending: exact fit is not enough
    inc.read_packet()
    assert inc.commit() is True  # free 192 > 128, and it was not before: signal
    inc.read_packet()
    assert inc.commit() is False  # already enough before this commit: no second signal
    out.write(b"B" * 96)
    assert control(mem)["pending"] == 0  # a successful write disarms


@impls
def test_pending_send_low_bits_ignored(impl: str) -> None:
    """A peer asking for size-1 ("wake me when empty") still gets woken."""
    size = 4096
    out, inc, mem = make_pair(impl, size)
    for _ in range(10):
        out.write(b"x" * 40)
    out.commit()
    struct.pack_into("<I", mem, 12, size - 1)
    for _ in range(9):
        inc.read_packet()
    assert inc.commit() is False
    inc.read_packet()
    assert inc.commit() is True


@impls
def test_no_signal_without_feature_bit(impl: str) -> None:
    out, inc, mem = make_pair(impl)
    struct.pack_into("<I", mem, 64, 0)
    for _ in range(63):
        out.write(b"p" * 40)
    out.commit()
    struct.pack_into("<I", mem, 12, 64)
    list(inc)
    assert inc.commit() is False


@impls
def test_ring_at_odd_offset_in_larger_buffer(impl: str) -> None:
    buf = bytearray(8 + 8192 + 64)
    out, inc, mem = make_pair(impl, 4096, buffer=buf, offset=8)
    out.write(b"offset ring")
    out.commit()
    assert bytes(inc.read_packet().payload)[:11] == b"offset ring"
    assert buf[:8] == bytes(8) and buf[8 + 8192 :] == bytes(64)
    out_cls = IMPLS[impl][0]
    with pytest.raises(ValueError):
        out_cls(bytearray(9000), 4, 8192)  # not 8-aligned
    with pytest.raises(ValueError):
        out_cls(bytearray(9000), 0, 4096 + 100)  # data not a multiple of 4096


@impls
def test_read_into_batches(impl: str) -> None:
    out, inc, mem = make_pair(impl, 65536)
    sent = [payload_of(k, 8 * (k % 9 + 1)) for k in range(200)]
    for k, p in enumerate(sent):
        out.write(p, trans_id=k)
    out.commit()
    buf = bytearray(4096)
    got = []
    while (batch := inc.read_into(buf, 64, payload_only=True)).count:
        for info in batch.packets:
            got.append((info.trans_id, bytes(buf[info.out_offset : info.out_offset + info.out_len])))
        assert batch.nbytes <= len(buf)
    assert got == list(enumerate(sent))


@impls
def test_write_many_stops_when_full(impl: str) -> None:
    import array

    out, inc, mem = make_pair(impl, 4096)
    lens = array.array("I", [40] * 100)
    n = out.write_many(b"w" * 4000, lens, trans_id0=1000)
    assert n == 63
    out.commit()
    assert [p.trans_id for p in inc][:3] == [1000, 1001, 1002]
