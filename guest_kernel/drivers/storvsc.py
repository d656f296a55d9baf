"""The guest's paravirtual SCSI disk driver (a storvsc) and its block device.

``start`` runs the storvsc initialisation on the primary channel (BEGIN,
QUERY_PROTOCOL_VERSION newest first, QUERY_PROPERTIES, END), asks for
sub-channels when the host supports several, and reads the capacity.
I/O then spreads round-robin over every open channel (multi-queue).

The block device API takes byte offsets (multiples of the 512-byte block)
or LBAs: ``read``, ``write`` (optionally FUA), ``flush``, ``discard``, and
``submit`` for many requests at once: they are staged on each queue and
published with one ring commit per queue, so a batch of N costs at most
one HvSignalEvent per queue.  Data travels by page list (GPA-direct): the
driver copies a write into pages of guest RAM and names them; the host
reads or writes them in place.  ``BlockFile`` gives a file-like view.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ring import GpaRange, PacketType
from ring._api import encode_gpa_direct_header
from vmbus.channel import Channel, Requestor
from vmbus.device import GuestDriver
from vmbus.errors import ChannelRevoked
from vmbus.protocols import storvsc as S

from ..memory import DmaBuffer

PAGE = 4096
SUBCHANNEL_WAIT = 5.0
BATCH_PER_QUEUE = 32
BYTES_PER_QUEUE = 2 << 20


class BlockError(IOError):
    """The disk answered with an error: a SCSI CHECK CONDITION or an NTSTATUS."""

    def __init__(self, message: str, *, sense: tuple[int, int, int] | None = None, status: int = 0) -> None:
        super().__init__(message)
        self.sense = sense
        self.status = status


@dataclass
class BlockRequest:
    op: str  # "read", "write", "flush", "discard"
    offset: int = 0
    length: int = 0
    data: bytes | bytearray | memoryview = b""
    fua: bool = False
    buffer: DmaBuffer | None = None  # zero-copy: read into / write from these guest pages


@dataclass
class BlockResult:
    data: bytes | None = None
    error: BlockError | None = None


class StorvscDriver(GuestDriver):
    subchannels_wanted = 3
    # Spins to poll for completions before sleeping on the SynIC interrupt
    # (``Channel.poll_spins``).  Off: today a completion takes longer than a
    # useful spin, so polling only burns CPU; worth turning on once the host's
    # per-request path is fast.
    poll_spins = 0

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        channel.poll_spins = self.poll_spins
        self.queues: list[Requestor] = [Requestor(channel, capacity=self._capacity(channel))]
        self._next_queue = itertools.count()
        self.block_size = 512
        self.capacity = 0
        self.max_transfer = 0
        self.version = 0
        self.read_only = False
        self._subchannels_expected = 0
        self._subchannels_ready = trio.Event()

    @staticmethod
    def _capacity(channel: Channel) -> int:
        # Linux: (ring - 4096) / 360 outstanding requests per channel
        return max(1, min(256, channel.outgoing.data_size // 360))

    async def start(self, nursery: Any) -> None:
        nursery.start_soon(self.queues[0].run)
        await self._control(S.Operation.BEGIN_INITIALIZATION)
        for version in sorted(S.ProtocolVersion, reverse=True):
            status, _ = await self._control(S.Operation.QUERY_PROTOCOL_VERSION, S.PROTOCOL_VERSION.pack(version, 0),
                                            check=False)
            if status == S.NtStatus.SUCCESS:
                self.version = version
                break
        else:
            raise BlockError("the host accepts none of our storage protocol versions")
        _, body = await self._control(S.Operation.QUERY_PROPERTIES)
        _, max_channels, _, flags, self.max_transfer, _ = S.PROPERTIES.unpack_from(body)
        await self._control(S.Operation.END_INITIALIZATION)
        want = min(self.subchannels_wanted, max_channels) if flags & S.SUPPORTS_MULTI_CHANNEL else 0
        if want:
            _, body = await self._control(S.Operation.CREATE_SUB_CHANNELS, S.SUB_CHANNEL_COUNT.pack(want))
            (self._subchannels_expected,) = S.SUB_CHANNEL_COUNT.unpack_from(body)
        if self._subchannels_expected:
            with trio.move_on_after(SUBCHANNEL_WAIT):
                await self._subchannels_ready.wait()
        cap = await self._scsi(bytes([S.Opcode.SERVICE_ACTION_IN_16, S.READ_CAPACITY_16_ACTION]) + bytes(8)
                               + struct.pack(">I", 32) + bytes(2), data_in=True, length=32)
        last_lba, self.block_size = struct.unpack_from(">QI", cap)
        self.capacity = (last_lba + 1) * self.block_size
        mode = await self._scsi(bytes([S.Opcode.MODE_SENSE_6, 0, 0x08, 0, 64, 0]), data_in=True, length=64)
        self.read_only = bool(mode[2] & 0x80)

    async def add_subchannel(self, channel: Channel, nursery: Any) -> None:
        channel.poll_spins = self.poll_spins
        queue = Requestor(channel, capacity=self._capacity(channel))
        self.queues.append(queue)
        nursery.start_soon(queue.run)
        if len(self.queues) - 1 >= self._subchannels_expected:
            self._subchannels_ready.set()

    async def stop(self) -> None:
        for q in self.queues:
            q.fail_all()

    # -- control and single commands -----------------------------------------

    async def _control(self, op: int, body: bytes = b"", *, check: bool = True) -> tuple[int, bytes]:
        pkt = await self.queues[0].request(S.packet(op, 0, body))
        operation, _, status, reply = S.PACKET.unpack_from(bytes(pkt.payload).ljust(S.PACKET_SIZE, b"\0"))
        if check and (operation != S.Operation.COMPLETE_IO or status != S.NtStatus.SUCCESS):
            raise BlockError(f"storage {S.Operation(op).name} failed", status=status)
        return status, reply

    async def _scsi(self, cdb: bytes, *, data_in: bool, length: int) -> bytes:
        (res,) = await self._submit_cdbs([(cdb, data_in, length, b"")])
        if res.error:
            raise res.error
        return res.data or b""

    # -- the block device -------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset % self.block_size or length % self.block_size or offset < 0 or length < 0:
            raise ValueError(f"offset {offset} and length {length} must be multiples of {self.block_size}")
        if length > self.max_transfer:
            raise ValueError(f"{length} bytes exceed the largest transfer, {self.max_transfer}")

    def _cdb(self, req: BlockRequest) -> tuple[bytes, bool, int, bytes]:
        if req.op in ("read", "write"):
            if req.buffer is not None:
                length = req.length or len(req.buffer.view)
                if length > len(req.buffer.view):
                    raise ValueError("request longer than its buffer")
            else:
                length = req.length if req.op == "read" else len(req.data)
            self._check(req.offset, length)
            cdb = S.read_write_cdb(req.op == "write", req.offset // self.block_size, length // self.block_size,
                                   fua=req.fua)
            out = b"" if req.op == "read" or req.buffer is not None else bytes(req.data)
            return cdb, req.op == "read", length, out
        if req.op == "flush":
            return bytes([S.Opcode.SYNCHRONIZE_CACHE_10]) + bytes(9), False, 0, b""
        if req.op == "discard":
            self._check(req.offset, 0)
            if req.length % self.block_size:
                raise ValueError("discard length must be a multiple of the block size")
            params = struct.pack(">HH4sQI4s", 22, 16, b"", req.offset // self.block_size,
                                 req.length // self.block_size, b"")
            return struct.pack(">BB4sBHB", S.Opcode.UNMAP, 0, b"", 0, len(params), 0), False, len(params), params
        raise ValueError(f"unknown block operation {req.op!r}")

    def buffer(self, nbytes: int) -> DmaBuffer:
        """Guest pages for zero-copy I/O (free them, or use ``with``)."""
        return DmaBuffer(self.ram, nbytes)

    async def submit(self, requests: Sequence[BlockRequest]) -> list[BlockResult]:
        """Many requests at once, spread over the queues; results in order.
        Reads into a ``DmaBuffer`` leave ``data`` None: the bytes are in it."""
        return await self._submit_cdbs([self._cdb(r) for r in requests], [r.buffer for r in requests])

    async def _submit_cdbs(
        self, cdbs: Sequence[tuple[bytes, bool, int, bytes]], buffers: Sequence[DmaBuffer | None] | None = None
    ) -> list[BlockResult]:
        live = [q for q in self.queues if not q.channel.revoked and not q.channel.closed]
        if not live:
            raise ChannelRevoked("every queue of the disk is gone")
        # Runs of up to BATCH_PER_QUEUE requests (or BYTES_PER_QUEUE of data)
        # go to one queue, the next run to the next queue: a batch of small
        # requests costs one commit and at most one signal, large transfers
        # spread over the host's per-queue workers, and concurrent
        # submitters rotate over every queue.
        nq = len(live)
        per_queue: list[list[int]] = [[] for _ in range(nq)]
        q = next(self._next_queue) % nq
        run = run_bytes = 0
        for i, (_, _, length, _) in enumerate(cdbs):
            if run and (run >= BATCH_PER_QUEUE or run_bytes + length > BYTES_PER_QUEUE):
                q, run, run_bytes = (q + 1) % nq, 0, 0
            per_queue[q].append(i)
            run += 1
            run_bytes += length
        results: list[BlockResult] = [BlockResult() for _ in cdbs]

        async def run_queue(q: int, idx: list[int]) -> None:
            pages: list[tuple[int, int]] = []
            try:
                items = []
                for i in idx:
                    cdb, data_in, length, out = cdbs[i]
                    buf = buffers[i] if buffers else None
                    if length and buf is not None:
                        npages = (length + PAGE - 1) // PAGE
                        pfn = buf.pfn
                        pages.append((pfn, 0))  # the caller's pages: not ours to free or copy
                        header = encode_gpa_direct_header([GpaRange(length, 0, range(pfn, pfn + npages))])
                        ptype = PacketType.DATA_USING_GPA_DIRECT
                    elif length:
                        npages = (length + PAGE - 1) // PAGE
                        pfn = self.ram.alloc(npages, zero=False)  # the host or our copy fills it
                        pages.append((pfn, npages))
                        if out:
                            self.ram.pages_view(pfn, npages)[: len(out)] = out
                        header = encode_gpa_direct_header([GpaRange(length, 0, range(pfn, pfn + npages))])
                        ptype = PacketType.DATA_USING_GPA_DIRECT
                    else:
                        header, ptype = b"", PacketType.DATA_INBAND
                        pages.append((0, 0))
                    srb = S.scsi_request(cdb, data_in, length)
                    items.append((S.packet(S.Operation.EXECUTE_SRB, 0, srb), ptype, header))
                completions = await live[q].request_many(items)
                for i, pkt, (pfn, npages) in zip(idx, completions, pages):
                    results[i] = self._result(bytes(pkt.payload), cdbs[i], pfn, npages)
            finally:
                for pfn, npages in pages:
                    if npages:
                        self.ram.free(pfn, npages)

        async with trio.open_nursery() as nursery:
            for q, idx in enumerate(per_queue):
                if idx:
                    nursery.start_soon(run_queue, q, idx)
        return results

    def _result(self, payload: bytes, cdb: tuple[bytes, bool, int, bytes], pfn: int, npages: int) -> BlockResult:
        operation, _, status, body = S.PACKET.unpack_from(payload.ljust(S.PACKET_SIZE, b"\0"))
        if operation != S.Operation.COMPLETE_IO or status != S.NtStatus.SUCCESS:
            return BlockResult(error=BlockError(f"request refused (NTSTATUS {status:#x})", status=status))
        srb = S.SCSI_REQUEST.unpack_from(body)
        srb_status, scsi_status, transferred, sense = srb[1], srb[2], srb[11], srb[12]
        if scsi_status != S.ScsiStatus.GOOD or (srb_status & 0x3F) != S.SrbStatus.SUCCESS:
            key = S.parse_sense(sense) if srb_status & S.SrbStatus.AUTOSENSE_VALID else None
            what = f"sense {key[0]:#x}/{key[1]:#x}/{key[2]:#x}" if key else f"SRB status {srb_status:#x}"
            return BlockResult(error=BlockError(f"SCSI {cdb[0][0]:#04x} failed: {what}", sense=key))
        if cdb[1] and npages:
            return BlockResult(data=bytes(self.ram.pages_view(pfn, npages)[: min(transferred, cdb[2])]))
        return BlockResult()

    async def _one(self, req: BlockRequest) -> bytes | None:
        (res,) = await self.submit([req])
        if res.error:
            raise res.error
        return res.data

    async def read(self, offset: int, length: int) -> bytes:
        return await self._one(BlockRequest("read", offset, length)) or b""

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await self._one(BlockRequest("write", offset, data=data, fua=fua))

    async def flush(self) -> None:
        await self._one(BlockRequest("flush"))

    async def discard(self, offset: int, length: int) -> None:
        await self._one(BlockRequest("discard", offset, length))

    async def read_blocks(self, lba: int, count: int) -> bytes:
        return await self.read(lba * self.block_size, count * self.block_size)

    async def write_blocks(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        await self.write(lba * self.block_size, data, fua=fua)

    def open(self) -> BlockFile:
        return BlockFile(self)


class BlockFile:
    """A file-like view of the disk: async ``read``/``write`` at a position,
    ``seek``/``tell``; reads and writes of any length and alignment (partial
    blocks are read, merged and written back)."""

    def __init__(self, disk: StorvscDriver) -> None:
        self.disk = disk
        self.pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.disk.capacity}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _span(self, n: int) -> tuple[int, int]:
        bs = self.disk.block_size
        start = self.pos - self.pos % bs
        end = min(self.disk.capacity, -(-(self.pos + n) // bs) * bs)
        return start, end

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.disk.capacity - self.pos
        n = max(0, min(n, self.disk.capacity - self.pos))
        out = bytearray()
        while len(out) < n:
            start, end = self._span(min(n - len(out), self.disk.max_transfer - self.disk.block_size))
            data = await self.disk.read(start, end - start)
            chunk = data[self.pos - start : self.pos - start + n - len(out)]
            out += chunk
            self.pos += len(chunk)
        return bytes(out)

    async def write(self, data: bytes) -> int:
        view = memoryview(bytes(data))
        while view:
            start, end = self._span(min(len(view), self.disk.max_transfer - self.disk.block_size))
            take = min(len(view), end - self.pos)
            block = bytearray(await self.disk.read(start, end - start)) if (
                self.pos != start or (self.pos + take) % self.disk.block_size) else bytearray(end - start)
            block[self.pos - start : self.pos - start + take] = view[:take]
            await self.disk.write(start, block)
            self.pos += take
            view = view[take:]
        return len(data)
