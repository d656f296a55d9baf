"""Doorbells (eventfd, awaited in trio) and sealed memfd shared memory."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from ring import Doorbell, IncomingRing, OutgoingRing, SharedMemory


async def test_doorbell_wakes_trio_waiter_and_counts() -> None:
    db = Doorbell()
    got = []

    async def waiter() -> None:
        got.append(await db.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        db.ring()
        db.ring()
    assert got == [2]  # two rings before the waiter ran coalesce into one wake-up
    assert (db.rings, db.wakeups, db.signals_received) == (2, 1, 2)
    db.close()


async def test_close_wakes_waiter_with_closed_resource_error() -> None:
    db = Doorbell()
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await db.wait()
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        db.close()
    assert len(errors) == 1 and db.closed
    db.close()  # idempotent


def test_blocking_doorbell_and_timeout() -> None:
    db = Doorbell(blocking=True)
    assert db.wait_blocking(timeout=0.001) == 0
    db.ring()
    assert db.wait_blocking() == 1
    with pytest.raises(RuntimeError):
        db.try_consume()
    db.close()


def test_shared_memory_passed_over_scm_rights_is_the_same_ring() -> None:
    shm = SharedMemory.create(8192 * 2)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    socket.send_fds(a, [b"ring"], [shm.fd])
    msg, fds, _, _ = socket.recv_fds(b, 16, 1)
    assert msg == b"ring"
    peer = SharedMemory.attach(fds[0], 16384)
    out = OutgoingRing(shm.buf, 0, 8192, format=True)
    inc = IncomingRing(peer.buf, 0, 8192)
    out.write(b"across the fd")
    out.commit()
    pkt = inc.read_packet()
    assert pkt is not None and bytes(pkt.payload)[:13] == b"across the fd"
    with pytest.raises(OSError):
        os.ftruncate(shm.fd, 4096)  # sealed: the owner cannot shrink it under the peer
    a.close()
    b.close()


def test_attach_refuses_short_or_unsealed_memory() -> None:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8192)
    with pytest.raises(ValueError, match="shrunk"):
        SharedMemory.attach(fd, 8192)
    os.close(fd)
    shm = SharedMemory.create(8192)
    with pytest.raises(ValueError, match="promised"):
        SharedMemory.attach(os.dup(shm.fd), 16384)


_RINGS_IN_CYCLES = """
import gc, mmap
from ring import IncomingRing, OutgoingRing
mem = mmap.mmap(-1, 1 << 20)
for _ in range(50):
    class Owner: pass
    owner = Owner(); owner.me = owner  # a cycle, as channels and drivers make
    owner.rings = [OutgoingRing(mem, k * 16384, 16384, format=True) for k in range(8)]
    owner.rings += [IncomingRing(mem, k * 16384, 16384) for k in range(8)]
    del owner
    gc.collect()
print("collected")
"""


def test_rings_in_reference_cycles_are_collected_safely() -> None:
    # A ring used to keep a cffi buffer exporting its memoryview; clearing
    # that cycle crashed CPython 3.11 in the collector (python/cpython#77894).
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RINGS_IN_CYCLES], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "collected"
    assert "BufferError" not in done.stderr


def test_a_ring_pins_the_memory_it_lies_on() -> None:
    import mmap

    mapping = mmap.mmap(-1, 16384)
    ring = OutgoingRing(mapping, 0, 8192, format=True)
    with pytest.raises(BufferError):
        mapping.close()  # the ring's address would dangle
    backing = bytearray(8192)
    other = OutgoingRing(backing, 0, 8192, format=True)
    with pytest.raises(BufferError):
        backing.extend(b"x")  # a resize could move it
    del ring, other
    mapping.close()
    backing.extend(b"x")
