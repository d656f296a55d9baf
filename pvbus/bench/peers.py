"""The transports the ring is measured against, moving the same workload.

- ``os.pipe``: a raw pipe pair.  A message is a 4-byte length and the
  payload; "single" issues one ``writev`` per message, "batched" one
  ``writev`` per batch.  The reader reads whatever is there and splits
  frames, as any message protocol over a byte stream must.
- ``multiprocessing.Pipe``: ``send_bytes`` / ``recv_bytes_into``, one
  message per call (it has no batch API).
- ``faster_fifo.Queue``: ``put`` / ``get`` and ``put_many`` / ``get_many``.

Each side of each transport reports the same things as the ring's
(``ringpair``): count and chained CRC-32 of the payloads it received.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import Any

from . import workload

_LEN = struct.Struct("<I")


class OsPipe:
    name = "os.pipe"
    batch_api = True

    def __init__(self) -> None:
        self.fwd = os.pipe()
        self.back = os.pipe()

    def _ends(self, side: int) -> tuple[int, int]:
        """(read fd, write fd) for side 0 (producer/pinger) or 1."""
        return (self.back[0], self.fwd[1]) if side == 0 else (self.fwd[0], self.back[1])

    def produce(self, count: int, size: int, batch: int) -> dict[str, Any]:
        _, wfd = self._ends(0)
        hdr = _LEN.pack(size)
        t0 = time.perf_counter()
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            iov: list[Any] = []
            for k in range(sent, sent + n):
                iov += (hdr, workload.message(k, size))
            _writev_all(wfd, iov)
            sent += n
        return {"t_start": t0, "sent": sent}

    def consume(self, count: int, size: int, batch: int) -> dict[str, Any]:
        rfd, _ = self._ends(1)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        have = 0
        got = 0
        crc = 0
        while got < count:
            n = os.readv(rfd, [view[have:]])
            if n == 0:
                raise EOFError("pipe closed early")
            have += n
            pos = 0
            while have - pos >= 4:
                (length,) = _LEN.unpack_from(buf, pos)
                if have - pos - 4 < length:
                    break
                crc = zlib.crc32(view[pos + 4 : pos + 4 + length], crc)
                got += 1
                pos += 4 + length
            buf[: have - pos] = buf[pos:have]
            have -= pos
        return {"t_end": time.perf_counter(), "received": got, "crc": crc}

    def ping(self, iterations: int, size: int, warmup: int = 200) -> dict[str, Any]:
        # Small frames: one write and (almost always) one read per message.
        rfd, wfd = self._ends(0)
        return _ping(lambda m: _writev_all(wfd, [_LEN.pack(len(m)) + m]), lambda: _read_frame(rfd),
                     iterations, size, warmup)

    def pong(self, iterations: int, size: int, warmup: int = 200) -> dict[str, Any]:
        rfd, wfd = self._ends(1)
        for _ in range(warmup + iterations):
            m = _read_frame(rfd)
            _writev_all(wfd, [_LEN.pack(len(m)) + m])
        return {}


def _writev_all(fd: int, iov: list[Any]) -> None:
    while iov:
        n = os.writev(fd, iov[:1024])  # IOV_MAX
        while n:
            first = memoryview(iov[0])
            if n >= len(first):
                n -= len(first)
                iov.pop(0)
            else:
                iov[0] = first[n:]
                n = 0


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("pipe closed early")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read_frame(fd: int) -> bytes:
    head = os.read(fd, 4 + 4096)
    if len(head) < 4:
        head += _read_exact(fd, 4 - len(head))
    (length,) = _LEN.unpack_from(head)
    body = head[4:]
    return body if len(body) == length else body + _read_exact(fd, length - len(body))


def _ping(send: Any, recv: Any, iterations: int, size: int, warmup: int) -> dict[str, Any]:
    msg = bytes(workload.message(0, size))
    rtts = []
    for i in range(warmup + iterations):
        t0 = time.perf_counter_ns()
        send(msg)
        back = recv()
        t1 = time.perf_counter_ns()
        if back != msg:
            raise RuntimeError(f"round trip {i} came back wrong")
        if i >= warmup:
            rtts.append(t1 - t0)
    return {"rtt_ns": rtts}


class MpPipe:
    name = "multiprocessing.Pipe"
    batch_api = False

    def __init__(self) -> None:
        import multiprocessing

        self.a, self.b = multiprocessing.get_context("fork").Pipe(duplex=True)

    def produce(self, count: int, size: int, batch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        for k in range(count):
            self.a.send_bytes(workload.message(k, size))
        return {"t_start": t0, "sent": count}

    def consume(self, count: int, size: int, batch: int) -> dict[str, Any]:
        buf = bytearray(size)
        crc = 0
        for _ in range(count):
            n = self.b.recv_bytes_into(buf)
            crc = zlib.crc32(memoryview(buf)[:n], crc)
        return {"t_end": time.perf_counter(), "received": count, "crc": crc}

    def ping(self, iterations: int, size: int, warmup: int = 200) -> dict[str, Any]:
        return _ping(self.a.send_bytes, self.a.recv_bytes, iterations, size, warmup)

    def pong(self, iterations: int, size: int, warmup: int = 200) -> dict[str, Any]:
        for _ in range(warmup + iterations):
            self.b.send_bytes(self.b.recv_bytes())
        return {}


class FasterFifo:
    name = "faster_fifo.Queue"
    batch_api = True

    def __init__(self) -> None:
        from faster_fifo import Queue

        self.fwd = Queue(max_size_bytes=16 << 20)
        self.back = Queue(max_size_bytes=16 << 20)

    def produce(self, count: int, size: int, batch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            if batch > 1:
                self.fwd.put_many([bytes(workload.message(k, size)) for k in range(sent, sent + n)], timeout=60)
            else:
                self.fwd.put(bytes(workload.message(sent, size)), timeout=60)
            sent += n
        return {"t_start": t0, "sent": sent}

    def consume(self, count: int, size: int, batch: int) -> dict[str, Any]:
        crc = 0
        got = 0
        while got < count:
            if batch > 1:
                msgs = self.fwd.get_many(max_messages_to_get=batch, timeout=60)
            else:
                msgs = [self.fwd.get(timeout=60)]
            for m in msgs:
                crc = zlib.crc32(m, crc)
            got += len(msgs)
        return {"t_end": time.perf_counter(), "received": got, "crc": crc}

    def ping(self, iterations: int, size: int, warmup: int = 200) -> dict[str, Any]:
        return _ping(self.fwd.put, lambda: self.back.get(timeout=60), iterations, size, warmup)

    def pong(self, iterations: int, size: int, warmup: int = 200) -> dict[str, Any]:
        for _ in range(warmup + iterations):
            self.back.put(self.fwd.get(timeout=60))
        return {}


def available_peers() -> list[Any]:
    peers: list[Any] = [OsPipe, MpPipe]
    try:
        import faster_fifo  # noqa: F401
    except ImportError:
        pass
    else:
        peers.append(FasterFifo)
    return peers
