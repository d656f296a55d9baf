"""A hypothesis state machine drives the C ring, the Python reference ring
and a model with the same random operations.  After every step the two
rings' shared memory must be identical byte for byte, every result equal,
and every packet read must be the one the model says comes next."""

from __future__ import annotations

import array
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ring import PacketTooLarge, RingFull

from .helpers import make_pair, payload_of

DATA_SIZE = 8192


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return ("ok", fn(*args, **kwargs))
    except RingFull as exc:
        return ("full", exc.needed)
    except PacketTooLarge as exc:
        return ("too-large", exc.total)
    except ValueError as exc:
        return ("value-error", type(exc).__name__)


class RingMachine(RuleBasedStateMachine):
    @initialize(start=st.integers(0, DATA_SIZE // 8 - 1))
    def setup(self, start: int) -> None:
        self.c = make_pair("c", DATA_SIZE, start=start * 8)
        self.py = make_pair("py", DATA_SIZE, start=start * 8)
        self.staged: list[tuple[int, int, bytes]] = []
        self.published: deque[tuple[int, int, bytes]] = deque()
        self.taken = 0  # read but not yet released
        self.unreleased = 0  # published packets the reader has not released
        self.masked = False
        self.counter = 0

    def _expect_packet(self, ptype: int, trans_id: int, payload: bytes) -> None:
        want_type, want_id, want_payload = self.published.popleft()
        assert (ptype, trans_id) == (want_type, want_id)
        assert payload[: len(want_payload)] == want_payload
        assert payload[len(want_payload) :] == bytes(len(payload) - len(want_payload))

    @rule(size=st.integers(0, 3000), completion=st.booleans(), kind=st.sampled_from([6, 0xB]))
    def write(self, size: int, completion: bool, kind: int) -> None:
        self.counter += 1
        data = payload_of(self.counter, size)
        args = dict(trans_id=self.counter, completion_requested=completion, packet_type=kind)
        rc = outcome(self.c.out.write, data, **args)
        assert rc == outcome(self.py.out.write, data, **args)
        if rc[0] == "ok":
            self.staged.append((kind, self.counter, data))

    @rule(n=st.integers(1, 40), size=st.integers(0, 200))
    def write_many(self, n: int, size: int) -> None:
        lens = array.array("I", [size] * n)
        blob = b"".join(payload_of(self.counter + 1 + k, size) for k in range(n))
        rc = outcome(self.c.out.write_many, blob, lens, trans_id0=self.counter + 1)
        assert rc == outcome(self.py.out.write_many, blob, lens, trans_id0=self.counter + 1)
        if rc[0] == "ok":
            for k in range(rc[1]):
                self.staged.append((6, self.counter + 1 + k, payload_of(self.counter + 1 + k, size)))
        self.counter += n

    @rule()
    def commit_write(self) -> None:
        expect_signal = bool(self.staged) and not self.masked and self.unreleased == 0
        got = self.c.out.commit()
        assert got == self.py.out.commit() == expect_signal
        self.published.extend(self.staged)
        self.unreleased += len(self.staged)
        self.staged.clear()

    @rule()
    def revert_write(self) -> None:
        self.c.out.revert()
        self.py.out.revert()
        self.staged.clear()

    @rule(k=st.integers(1, 20))
    def read_packets(self, k: int) -> None:
        for _ in range(k):
            a, b = self.c.inc.read_packet(), self.py.inc.read_packet()
            assert (a is None) == (b is None)
            if a is None:
                assert not self.published
                return
            assert (a.type, a.flags, a.trans_id, bytes(a.payload)) == (b.type, b.flags, b.trans_id, bytes(b.payload))
            self._expect_packet(a.type, a.trans_id, bytes(a.payload))
            self.taken += 1

    @rule(k=st.integers(1, 50), payload_only=st.booleans(), cap=st.sampled_from([512, 4096, 16384]))
    def read_into(self, k: int, payload_only: bool, cap: int) -> None:
        bufs = bytearray(cap), bytearray(cap)
        ra = outcome(self.c.inc.read_into, bufs[0], k, payload_only=payload_only)
        rb = outcome(self.py.inc.read_into, bufs[1], k, payload_only=payload_only)
        assert ra[0] == rb[0]
        if ra[0] != "ok":
            return
        a, b = ra[1], rb[1]
        assert (a.count, a.nbytes) == (b.count, b.nbytes)
        assert a.packets == b.packets
        assert bufs[0][: a.nbytes] == bufs[1][: b.nbytes]
        for info in a.packets:
            start = info.out_offset + (0 if payload_only else info.header_len)
            body = bytes(bufs[0][start : info.out_offset + info.out_len])
            self._expect_packet(info.type, info.trans_id, body)
        self.taken += a.count

    @rule()
    def commit_read(self) -> None:
        assert self.c.inc.commit() == self.py.inc.commit()
        self.unreleased -= self.taken
        self.taken = 0

    @rule()
    def mask(self) -> None:
        self.c.inc.mask()
        self.py.inc.mask()
        self.masked = True

    @rule()
    def unmask(self) -> None:
        a, b = self.c.inc.unmask(), self.py.inc.unmask()
        assert a == b == (len(self.published) > 0)
        self.masked = False

    @precondition(lambda self: not self.staged)
    @rule(needed=st.integers(1, DATA_SIZE))
    def arm_pending_send(self, needed: int) -> None:
        assert outcome(self.c.out.arm_pending_send, needed) == outcome(self.py.out.arm_pending_send, needed)

    @invariant()
    def memories_identical(self) -> None:
        if hasattr(self, "c"):
            assert bytes(self.c.mem) == bytes(self.py.mem)
            assert self.c.inc.available == self.py.inc.available
            assert self.c.out.write_space == self.py.out.write_space


# about 4 s alone; many times that on a machine loaded several times over
pytestmark = pytest.mark.timeout(600)

TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
