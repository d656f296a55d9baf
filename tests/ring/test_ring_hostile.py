"""The peer is hostile: random indices, descriptors and lengths in the
control page and data area.  The C ring, over memory fenced by PROT_NONE
guard pages, must never crash or touch anything outside the ring; it must
answer RingCorrupt (or read valid packets) exactly as the reference does."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ring
from ring import RingCorrupt, RingFull

from .helpers import GuardedBuffer, make_pair

DATA = 4096


def drain(inc):  # noqa: ANN001, ANN201 - test glue
    seen: list[Any] = []
    try:
        for _ in range(DATA // 8):
            pkt = inc.read_packet()
            if pkt is None:
                seen.append("empty")
                break
            seen.append((pkt.type, pkt.flags, pkt.trans_id, bytes(pkt.header), bytes(pkt.payload)))
        inc.commit()
    except RingCorrupt as exc:
        seen.append(("corrupt", exc.reason, exc.value))
    return seen


hostile_ctl = st.fixed_dictionaries(
    {
        "write": st.one_of(st.integers(0, DATA // 8 - 1).map(lambda v: v * 8), st.integers(0, 2**32 - 1)),
        "read": st.one_of(st.integers(0, DATA // 8 - 1).map(lambda v: v * 8), st.integers(0, 2**32 - 1)),
        "mask": st.integers(0, 2**32 - 1),
        "pending": st.integers(0, 2**32 - 1),
        "features": st.integers(0, 2**32 - 1),
    }
)


@given(ctl=hostile_ctl, head=st.binary(max_size=256), seed=st.integers(0, 2**32))
def test_hostile_ring_reader(ctl: dict[str, int], head: bytes, seed: int) -> None:
    data = head + random.Random(seed).randbytes(DATA - len(head))
    g = GuardedBuffer(4096 + DATA)
    results = []
    for mem in (g.view, bytearray(4096 + DATA)):
        mem[4096:] = data
        struct.pack_into("<IIII", mem, 0, ctl["write"], ctl["read"], ctl["mask"], ctl["pending"])
        struct.pack_into("<I", mem, 64, ctl["features"])
        cls = ring.IncomingRing if mem is g.view else ring.PyIncomingRing
        inc = cls(mem)
        results.append(drain(inc))
        if inc.corrupt:  # sticky: every later call fails the same way
            with pytest.raises(RingCorrupt):
                inc.read_packet()
    assert results[0] == results[1]


@given(
    packets=st.lists(
        st.tuples(
            st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)
        ),
        min_size=1,
        max_size=6,
    ),
    start=st.integers(0, DATA // 8 - 1),
)
def test_hostile_descriptors(packets: list[tuple[int, int, int, int]], start: int) -> None:
    """Valid indices, forged descriptors (type, offset8, len8, flags)."""
    g = GuardedBuffer(4096 + DATA)
    results = []
    for mem in (g.view, bytearray(4096 + DATA)):
        mem[:] = bytes(len(mem))
        pos = start * 8
        for ptype, off8, len8, flags in packets:
            desc = struct.pack("<HHHHQ", ptype, off8, len8, flags, 7)
            for i, byte in enumerate(desc):
                mem[4096 + (pos + i) % DATA] = byte
            pos = (pos + max(len8, 2) * 8 + 8) % DATA
        struct.pack_into("<II", mem, 0, (start * 8 + 8 * 60) % DATA, start * 8)
        struct.pack_into("<I", mem, 64, 1)
        cls = ring.IncomingRing if mem is g.view else ring.PyIncomingRing
        results.append(drain(cls(mem)))
    assert results[0] == results[1]


@given(read=st.integers(0, 2**32 - 1), size=st.integers(0, 5000))
def test_hostile_read_index_against_writer(read: int, size: int) -> None:
    g = GuardedBuffer(4096 + DATA)
    outs: list[Any] = []
    for mem, impl in ((g.view, ring.OutgoingRing), (bytearray(4096 + DATA), ring.PyOutgoingRing)):
        out = impl(mem, format=True)
        struct.pack_into("<I", mem, 4, read)
        try:
            out.write(b"h" * size)
            outs.append(("ok", out.commit()))
        except RingCorrupt as exc:
            outs.append(("corrupt", exc.reason))
        except RingFull as exc:
            outs.append(("full", exc.needed))
        except ring.PacketTooLarge:
            outs.append(("too-large",))
        outs.append(bytes(mem))
    assert outs[0] == outs[2] and outs[1] == outs[3]


def test_corrupt_is_reported_with_reason() -> None:
    out, inc, mem = make_pair("c")
    out.write(b"fine")
    out.commit()
    struct.pack_into("<H", mem, 4096, 0x42)  # unknown type
    with pytest.raises(RingCorrupt) as info:
        inc.read_packet()
    assert (info.value.reason, info.value.value) == ("type", 0x42)
    struct.pack_into("<I", mem, 0, 13)  # unaligned write index
    with pytest.raises(RingCorrupt):
        inc.read_packet()
