"""Two processes joined by a pair of rings in one memfd, with eventfd doorbells.

This is the ring used bare, the way a channel uses it: ring 0 carries
side A -> side B, ring 1 carries B -> A, and each side has one incoming
doorbell that means "look at your rings" (data to read, or room to write),
as a VMBus channel has one interrupt per direction.

The wake-ups are the queue layer's own (``ring.queue.Waiter``, the waits of
``pv_serve`` in ``ring/csrc/queue.c``), so the benchmark measures the code
devices run:

- a consumer waits with ``wait_readable``: its interrupt masked while it
  drains (it takes packets in batches and commits once per batch,
  signalling the producer only when ``commit`` says a blocked writer is
  now satisfied), polling first in polling mode (in C, without the GIL),
  then unmasking and re-checking before it sleeps on its doorbell;
- a producer stages a batch, publishes it with one ``commit``, signals only
  when ``commit`` says so, and when the ring is full waits with
  ``wait_writable`` (arm ``pending_send_sz``, re-check, sleep until the
  consumer says there is room).
"""

from __future__ import annotations

import array
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from ring import (
    CONTROL_SIZE,
    DESCRIPTOR_SIZE,
    TRAILER_SIZE,
    Doorbell,
    IncomingRing,
    OutgoingRing,
    RingFull,
    SharedMemory,
    pad8,
)
from ring.queue import Waiter

from . import workload

POLL_US = 1000  # polling mode: spin this long before the doorbell
DEFAULT_DATA_SIZE = 2 << 20
RING_PACKETS = 256


def packet_total(payload: int) -> int:
    """Ring bytes one in-band packet of ``payload`` bytes takes, trailer included."""
    return DESCRIPTOR_SIZE + pad8(payload) + TRAILER_SIZE


def data_size_for(payload: int) -> int:
    """A ring sized in packets, as devices size theirs (a NIC's descriptor
    count, netvsc's send sections): room for RING_PACKETS packets of
    ``payload`` bytes, at least 2 MiB.  A writer that outruns its reader
    sleeps until half the ring is free, one signal per half ring: with 64 KiB
    packets a 2 MiB ring costs a signal every 16 packets, this one every 128."""
    return max(DEFAULT_DATA_SIZE, -(-RING_PACKETS * packet_total(payload) // 4096) * 4096)


@dataclass
class RingPair:
    """The shared parts: the memfd holding both rings and one doorbell per side."""

    data_size: int = DEFAULT_DATA_SIZE
    shm: SharedMemory = field(init=False)
    doorbells: tuple[Doorbell, Doorbell] = field(init=False)

    def __post_init__(self) -> None:
        ring_bytes = CONTROL_SIZE + self.data_size
        self.shm = SharedMemory.create(2 * ring_bytes, "pvbus-ringpair")
        for i in range(2):
            OutgoingRing(self.shm.buf, i * ring_bytes, ring_bytes, format=True)
        # Blocking eventfds: the benchmark processes run no trio, and a
        # blocking read is one system call per wake-up.
        self.doorbells = (Doorbell(blocking=True), Doorbell(blocking=True))

    def endpoint(self, which: int) -> RingSide:
        """The runner's name for ``side`` (interrupt mode)."""
        return self.side(which)

    def side(self, which: int, *, polling: bool = False) -> RingSide:
        """Side 0 (A) or 1 (B) as seen from the process that will use it."""
        ring_bytes = CONTROL_SIZE + self.data_size
        return RingSide(
            tx=OutgoingRing(self.shm.buf, which * ring_bytes, ring_bytes),
            rx=IncomingRing(self.shm.buf, (1 - which) * ring_bytes, ring_bytes),
            me=self.doorbells[which],
            peer=self.doorbells[1 - which],
            polling=polling,
        )

    def close(self) -> None:
        for db in self.doorbells:
            db.close()
        self.shm.close()


@dataclass
class RingSide:
    tx: OutgoingRing
    rx: IncomingRing
    me: Doorbell
    peer: Doorbell
    polling: bool
    waiter: Waiter = field(init=False)

    def __post_init__(self) -> None:
        self.waiter = Waiter(self.rx, self.tx, self.me.fileno(), spin_us=POLL_US if self.polling else 0)

    @property
    def sleeps(self) -> int:
        return self.waiter.counters()["sleeps"]

    # -- waiting (the queue layer's) -----------------------------------------

    def wait_readable(self) -> None:
        """Return once ``rx`` has data.  On return interrupts are masked
        (we are about to drain); ``rx`` must be drained and committed
        before calling again."""
        if rc := self.waiter.wait_readable():
            raise self.rx.corruption() if self.rx.corrupt else RuntimeError(f"ring wait ended ({rc:#x})")

    def wait_writable(self, needed: int) -> None:
        """Return once ``tx`` has more than ``needed`` free bytes."""
        if rc := self.waiter.wait_writable(needed):
            raise self.tx.corruption() if self.tx.corrupt else RuntimeError(f"ring wait ended ({rc:#x})")

    def commit_tx(self) -> None:
        if self.tx.commit():
            self.peer.ring()

    def commit_rx(self) -> None:
        if self.rx.commit():
            self.peer.ring()

    # -- one-way transfer ------------------------------------------------

    def produce(self, count: int, size: int, batch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        tx = self.tx
        sent = 0
        if batch > 1:
            lens = array.array("I", [size] * batch)
            # Ask to be woken when half the ring is free, not when one packet
            # fits: one wake-up then moves a large batch.
            want = max(tx.data_size // 2, packet_total(size))
            while sent < count:
                n = min(batch, count - sent)
                try:
                    w = tx.write_many(workload.batch(sent, n, size), lens[:n] if n < batch else lens, trans_id0=sent)
                except RingFull:
                    w = 0
                if w:
                    sent += w
                    self.commit_tx()
                if w < n:
                    self.wait_writable(want)
        else:
            need = packet_total(size)
            while sent < count:
                try:
                    tx.write(workload.message(sent, size), trans_id=sent)
                except RingFull:
                    self.wait_writable(need)
                    continue
                self.commit_tx()
                sent += 1
        return {"t_start": t0, "sent": sent, "signals": self.peer.rings, "sleeps": self.sleeps}

    def consume(self, count: int, size: int, batch: int) -> dict[str, Any]:
        rx = self.rx
        crc = 0
        got = 0
        if batch > 1 and size >= 32768:
            # Large packets: read them in place (no copy), release per batch.
            while got < count:
                self.wait_readable()
                while (pkt := rx.read_packet()) is not None:
                    crc = zlib.crc32(pkt.payload[:size], crc)
                    got += 1
                    if got % batch == 0:
                        self.commit_rx()
                self.commit_rx()
        elif batch > 1:
            # Small packets: one C call copies a whole batch out.
            out = bytearray(max(batch * packet_total(size), 1 << 20))
            view = memoryview(out)
            while got < count:
                self.wait_readable()
                while (b := rx.read_into(out, batch, payload_only=True)).count:
                    crc = zlib.crc32(view[: b.nbytes], crc)
                    got += b.count
                    self.commit_rx()
        else:
            while got < count:
                self.wait_readable()
                while (pkt := rx.read_packet()) is not None:
                    crc = zlib.crc32(pkt.payload[:size], crc)
                    got += 1
                    self.commit_rx()
        return {"t_end": time.perf_counter(), "received": got, "crc": crc,
                "signals": self.peer.rings, "sleeps": self.sleeps}

    # -- round trip --------------------------------------------------------

    def receive_one(self) -> Any:
        """Wait for and take one packet."""
        self.wait_readable()
        return self.rx.read_packet()

    def send_one(self, payload: Any, trans_id: int) -> None:
        if self.tx.send(payload, trans_id=trans_id):
            self.peer.ring()

    def ping(self, iterations: int, size: int, warmup: int = 200) -> dict[str, Any]:
        msg = bytes(workload.message(0, size))
        rtts = []
        for i in range(warmup + iterations):
            t0 = time.perf_counter_ns()
            self.send_one(msg, i)
            pkt = self.receive_one()
            t1 = time.perf_counter_ns()  # the echo is in hand
            # Checked in place, then released: the view is valid until the commit.
            if pkt is None or pkt.trans_id != i or pkt.payload[:size] != msg:
                raise RuntimeError(f"round trip {i} came back wrong")
            self.commit_rx()
            if i >= warmup:
                rtts.append(t1 - t0)
        return {"rtt_ns": rtts, "signals": self.peer.rings}

    def pong(self, iterations: int, size: int, warmup: int = 200) -> dict[str, Any]:
        for _ in range(warmup + iterations):
            pkt = self.receive_one()
            self.send_one(pkt.payload, pkt.trans_id)
            self.commit_rx()
        return {"signals": self.peer.rings}

    # -- mixed sizes, every message checked --------------------------------

    def produce_checked(self, count: int, seed: int) -> dict[str, Any]:
        sizes = mixed_sizes(count, seed)
        tx = self.tx
        k = 0
        pending = 0
        while k < count:
            size = sizes[k]
            try:
                tx.write([struct.pack("<QI", k, size), workload.message(k, size - 12)], trans_id=k)
            except RingFull:
                self.commit_tx()
                pending = 0
                self.wait_writable(packet_total(size))
                continue
            k += 1
            pending += 1
            if pending >= 32 or k == count:
                self.commit_tx()
                pending = 0
        return {"sent": k, "signals": self.peer.rings}

    def consume_checked(self, count: int, seed: int) -> dict[str, Any]:
        """Take ``count`` packets checking sequence, size and bytes of each."""
        sizes = mixed_sizes(count, seed)
        out = bytearray(4 << 20)
        view = memoryview(out)
        head = struct.Struct("<QI")
        got = 0
        bad = 0
        crc = 0
        while got < count:
            self.wait_readable()
            while (b := self.rx.read_into(out, 4096, payload_only=True)).count:
                for info in b.packets:
                    seq, size = head.unpack_from(out, info.out_offset)
                    body = view[info.out_offset + 12 : info.out_offset + size]
                    if (
                        got >= count
                        or seq != got
                        or size != sizes[got]
                        or info.trans_id != got
                        or body != workload.message(got, size - 12)
                    ):
                        bad += 1
                    crc = zlib.crc32(view[info.out_offset : info.out_offset + size], crc)
                    got += 1
                self.commit_rx()
        return {"received": got, "bad": bad, "crc": crc, "signals": self.peer.rings}


def mixed_sizes(count: int, seed: int) -> array.array:
    """Message sizes, 12 B to 64 KiB, mostly small, reproducible from ``seed``."""
    import random

    rng = random.Random(seed)
    sizes = array.array("I")
    for _ in range(count):
        roll = rng.random()
        if roll < 0.80:
            sizes.append(rng.randint(12, 256))
        elif roll < 0.98:
            sizes.append(rng.randint(257, 4096))
        else:
            sizes.append(rng.randint(4097, 65536))
    return sizes


def checked_crc(count: int, seed: int) -> int:
    """The CRC-32 ``consume_checked`` must report for a good transfer."""
    crc = 0
    for k, size in enumerate(mixed_sizes(count, seed)):
        crc = zlib.crc32(struct.pack("<QI", k, size), crc)
        crc = zlib.crc32(workload.message(k, size - 12), crc)
    return crc
