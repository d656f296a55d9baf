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
reads or writes them in place.  ``open()`` and ``open_sync()`` give the
disk as an async or a standard blocking Python file (``blockfile``).
"""

from __future__ import annotations

import errno
import io
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ring import PAGE_SIZE, GpaRange, Packet, PacketType, encode_gpa_direct_header
from vmbus.channel import Channel
from vmbus.device import GuestDriver
from vmbus.errors import ChannelRevoked
from vmbus.protocols import storvsc as S

from ..memory import DmaBuffer
from .blockfile import BlockFile, BlockRawIO, open_sync
from .storvsc_queue import DEFAULT_POLL_US, DiskQueue

__all__ = ["BlockError", "BlockFile", "BlockRawIO", "BlockRequest", "BlockResult", "StorvscDriver"]

PAGE = PAGE_SIZE
SUBCHANNEL_WAIT = 5.0
# A queue takes requests until it has this many, or this many bytes, in
# flight; then the next queue (and host worker) does.  8 MiB is over a
# millisecond of copying for one host worker: below that a second worker
# only competes for the CPUs (on two cores, 1 MiB reads at QD4 went from
# 0.7x to 0.95x of native when they stayed on one queue).
BATCH_PER_QUEUE = 32
BYTES_PER_QUEUE = 8 << 20


class BlockError(IOError):
    """The disk answered with an error: a SCSI CHECK CONDITION or an NTSTATUS.

    ``sense`` keeps the (key, ASC, ASCQ) codes, the message says them in
    words; ``errno`` is EROFS for a write-protected disk, ENOSPC when the
    host's storage is full, EIO for any other sense."""

    def __init__(self, message: str, *, sense: tuple[int, int, int] | None = None, status: int = 0,
                 index: int | None = None) -> None:
        super().__init__(message)
        self.sense = sense
        self.status = status
        self.index = index  # which request of a vectored call failed
        if sense is not None:
            self.errno = {S.WRITE_PROTECTED: errno.EROFS, S.SPACE_ALLOCATION_FAILED: errno.ENOSPC}.get(
                sense, errno.EIO)


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


@dataclass(slots=True)
class _Op:
    """One request on its way: what is sent, the pages it uses, its result."""

    length: int
    pfn: int = 0
    owned_pages: int = 0  # pages the driver allocated (freed after), 0 for the caller's buffer
    read_back: bool = False  # copy the data out of those pages into the result
    # (lba, pfn, blocks, write, fua): a read or write the C path builds
    io: tuple[int, int, int, bool, bool] | None = None
    command: tuple[bytes, bool] | None = None  # any other SCSI command: CDB, data in
    result: BlockResult = field(default_factory=BlockResult)


class StorvscDriver(GuestDriver):
    subchannels_wanted = 3
    # How long a submitter polls for its completions before sleeping on the
    # SynIC interrupt (``DiskQueue.poll_us``); 0 = pure interrupt mode.
    poll_us = DEFAULT_POLL_US

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.block_size = 512
        self.queues: list[DiskQueue] = [self._queue(channel)]
        self.queues[0].group = self.queues  # every queue polls all of them
        self.capacity = 0
        self.max_transfer = 0
        self.version = 0
        self.read_only = False
        self._subchannels_expected = 0
        self._subchannels_ready = trio.Event()

    def _queue(self, channel: Channel) -> DiskQueue:
        # Linux: (ring - 4096) / 360 outstanding requests per channel
        capacity = max(1, min(256, channel.outgoing.data_size // 360))
        return DiskQueue(channel, capacity, self.block_size, self.poll_us)

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
        self.max_transfer = min(self.max_transfer, S.MAX_TRANSFER)  # no more than our C path takes
        await self._control(S.Operation.END_INITIALIZATION)
        want = min(self.subchannels_wanted, max_channels) if flags & S.SUPPORTS_MULTI_CHANNEL else 0
        if want:
            _, body = await self._control(S.Operation.CREATE_SUB_CHANNELS, S.SUB_CHANNEL_COUNT.pack(want))
            (self._subchannels_expected,) = S.SUB_CHANNEL_COUNT.unpack_from(body)
        if self._subchannels_expected:
            with trio.move_on_after(SUBCHANNEL_WAIT):
                await self._subchannels_ready.wait()
        cap = await self.scsi(bytes([S.Opcode.SERVICE_ACTION_IN_16, S.READ_CAPACITY_16_ACTION]) + bytes(8)
                               + struct.pack(">I", 32) + bytes(2), data_in=True, length=32)
        last_lba, self.block_size = struct.unpack_from(">QI", cap)
        for queue in self.queues:
            queue.block_size = self.block_size
        self.capacity = (last_lba + 1) * self.block_size
        mode = await self.scsi(bytes([S.Opcode.MODE_SENSE_6, 0, 0x08, 0, 64, 0]), data_in=True, length=64)
        self.read_only = bool(mode[2] & 0x80)

    async def add_subchannel(self, channel: Channel, nursery: Any) -> None:
        queue = self._queue(channel)
        self.queues.append(queue)
        queue.group = self.queues
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

    async def scsi(self, cdb: bytes, *, data_in: bool, length: int) -> bytes:
        """SCSI pass-through: send one command (``cdb``) to the disk and
        return the data it moved in (``length`` bytes at most when
        ``data_in``); a failed command raises ``BlockError`` with its sense
        data.  For commands the block API does not cover (INQUIRY, VPD
        pages, REPORT LUNS ...)."""
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
        """The SCSI command of a request the C path does not build."""
        if req.op in ("read", "write"):  # zero length: a valid no-op command
            self._check(req.offset, 0)
            return S.read_write_cdb(req.op == "write", req.offset // self.block_size, 0), req.op == "read", 0, b""
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

    def _length(self, req: BlockRequest) -> int:
        if req.buffer is not None:
            length = req.length or len(req.buffer.view)
            if length > len(req.buffer.view):
                raise ValueError("request longer than its buffer")
        else:
            length = req.length if req.op == "read" else len(req.data)
        self._check(req.offset, length)
        return length

    def buffer(self, nbytes: int) -> DmaBuffer:
        """Guest pages for zero-copy I/O (free them, or use ``with``)."""
        return DmaBuffer(self.ram, nbytes)

    async def submit(self, requests: Sequence[BlockRequest]) -> list[BlockResult]:
        """Many requests at once, spread over the queues; results in order.
        Reads into a ``DmaBuffer`` leave ``data`` None: the bytes are in it."""
        return await self._execute(self._op, requests)

    async def read_into(self, offsets: Sequence[int], buffers: Sequence[DmaBuffer]) -> None:
        """Many reads at once, ``buffers[i]`` filled in full from byte
        ``offsets[i]`` (zero copy: the host reads into those guest pages).
        The cheapest call per request, for programs that keep their data in
        guest buffers (as O_DIRECT programs do): no request or result object
        each.  Every request runs to its end; then the first failure, if
        any, is raised as a ``BlockError`` whose ``index`` names it."""
        await self._transfer(False, offsets, buffers, fua=False)

    async def write_from(self, offsets: Sequence[int], buffers: Sequence[DmaBuffer], *, fua: bool = False) -> None:
        """Many writes at once, each of a whole guest buffer to its offset;
        ``fua``: durable before they complete.  Errors as ``read_into``."""
        await self._transfer(True, offsets, buffers, fua=fua)

    async def _transfer(self, write: bool, offsets: Sequence[int], buffers: Sequence[DmaBuffer], *,
                        fua: bool) -> None:
        if len(offsets) != len(buffers):
            raise ValueError(f"{len(offsets)} offsets for {len(buffers)} buffers")
        bs = self.block_size
        lengths = [len(buffer.view) for buffer in buffers]
        for offset, length in zip(offsets, lengths, strict=True):
            self._check(offset, length)
            if not length:
                raise ValueError("an empty buffer")
        requests = [(offset // bs, buffer.pfn, length // bs, write, fua)
                    for offset, buffer, length in zip(offsets, buffers, lengths, strict=True)]
        failures: list[tuple[int, BlockError]] = []
        opcode = S.Opcode.WRITE_16 if write else S.Opcode.READ_16

        async def run(queue: DiskQueue, picked: list[int]) -> None:
            answers = await queue.io([requests[i] for i in picked])
            for i, answer in zip(picked, answers, strict=True):
                failed, transferred = self._outcome(answer, opcode)
                if failed is None and transferred != lengths[i]:
                    failed = BlockError(f"short transfer: {transferred} of {lengths[i]} bytes")
                if failed is not None:
                    failures.append((i, failed))

        await self._on_queues(lengths, run)
        if failures:
            index, error = min(failures, key=lambda f: f[0])
            error.index = index
            raise error

    async def _submit_cdbs(self, cdbs: Sequence[tuple[bytes, bool, int, bytes]]) -> list[BlockResult]:
        return await self._execute(lambda cdb: self._command_op(*cdb), cdbs)

    async def _execute(self, make_op: Callable[[Any], _Op], items: Sequence[Any]) -> list[BlockResult]:
        """Turn each item into an ``_Op``, run them all, free the pages the
        driver allocated for them; the results in order."""
        ops: list[_Op] = []
        try:
            for item in items:
                ops.append(make_op(item))
            await self._submit_ops(ops)
            return [op.result for op in ops]
        finally:
            for op in ops:
                if op.owned_pages:
                    self.ram.free(op.pfn, op.owned_pages)

    def _op(self, req: BlockRequest) -> _Op:
        if req.op in ("read", "write") and (length := self._length(req)):
            write = req.op == "write"
            if req.buffer is not None:
                op = _Op(length, pfn=req.buffer.pfn)
            else:
                npages = (length + PAGE - 1) // PAGE
                op = _Op(length, pfn=self.ram.alloc(npages, zero=False), owned_pages=npages, read_back=not write)
                if write:
                    self.ram.pages_view(op.pfn, npages)[:length] = req.data
            op.io = (req.offset // self.block_size, op.pfn, length // self.block_size, write, req.fua)
            return op
        cdb, data_in, length, out = self._cdb(req)
        return self._command_op(cdb, data_in, length, out)

    def _command_op(self, cdb: bytes, data_in: bool, length: int, out: bytes) -> _Op:
        op = _Op(length, command=(cdb, data_in))
        if length:
            op.owned_pages = (length + PAGE - 1) // PAGE
            op.pfn = self.ram.alloc(op.owned_pages, zero=False)  # the host or our copy fills it
            op.read_back = data_in
            if out:
                self.ram.pages_view(op.pfn, op.owned_pages)[: len(out)] = out
        return op

    async def _submit_ops(self, ops: Sequence[_Op]) -> None:
        async def run(queue: DiskQueue, picked: list[int]) -> None:
            await self._run_queue(queue, [ops[i] for i in picked])

        await self._on_queues([op.length for op in ops], run)

    async def _on_queues(self, lengths: Sequence[int],
                         run: Callable[[DiskQueue, list[int]], Awaitable[None]]) -> None:
        """Spread requests of ``lengths`` bytes over the queues and ``run``
        each queue's share (indices into ``lengths``), concurrently when
        more than one queue takes part."""
        live = [q for q in self.queues if q.channel.active]
        if not live:
            raise ChannelRevoked("every queue of the disk is gone")
        # Fill the lowest-numbered queue up to BATCH_PER_QUEUE requests and
        # BYTES_PER_QUEUE bytes in flight (counting what is already there),
        # then the next: small requests keep to one queue, whose host worker
        # is then still polling when the next batch comes (a batch costs one
        # commit and at most one signal), while large transfers and heavy
        # load spread over the host's per-queue workers.  An idle queue
        # takes any request; when every queue is full the least busy does.
        nq = len(live)
        per_queue: list[list[int]] = [[] for _ in range(nq)]
        count = [queue.outstanding for queue in live]
        volume = [queue.bytes_in_flight for queue in live]
        q = 0
        for i, length in enumerate(lengths):
            start = q
            while count[q] and (count[q] >= BATCH_PER_QUEUE or volume[q] + length > BYTES_PER_QUEUE):
                q = (q + 1) % nq
                if q == start:
                    q = min(range(nq), key=count.__getitem__)
                    break
            per_queue[q].append(i)
            count[q] += 1
            volume[q] += length
        used = [(live[k], picked) for k, picked in enumerate(per_queue) if picked]
        if len(used) == 1:
            await run(*used[0])
            return
        async with trio.open_nursery() as nursery:
            for queue, picked in used:
                nursery.start_soon(run, queue, picked)

    async def _run_queue(self, queue: DiskQueue, ops: list[_Op]) -> None:
        ios = [op for op in ops if op.io is not None]
        commands = [op for op in ops if op.io is None]
        if ios:
            answers = await queue.io([op.io for op in ios])  # type: ignore[misc]
            for op, answer in zip(ios, answers, strict=True):
                op.result = self._io_result(op, answer)
        if commands:
            items = []
            for op in commands:
                assert op.command is not None
                cdb, data_in = op.command
                if op.length:
                    header = encode_gpa_direct_header(
                        [GpaRange(op.length, 0, range(op.pfn, op.pfn + op.owned_pages))])
                    ptype = PacketType.DATA_USING_GPA_DIRECT
                else:
                    header, ptype = b"", PacketType.DATA_INBAND
                srb = S.scsi_request(cdb, data_in, op.length)
                items.append((S.packet(S.Operation.EXECUTE_SRB, 0, srb), ptype, header))
            for op, pkt in zip(commands, await queue.request_many(items), strict=True):
                op.result = self._io_result(op, pkt)

    def _outcome(self, answer: int | Packet, opcode: int) -> tuple[BlockError | None, int]:
        """What a queue answered for a command: the bytes moved by one that
        succeeded (the C reaper checked its statuses), or its completion
        packet, decoded; returns (the error or None, bytes transferred)."""
        if isinstance(answer, int):
            return None, answer
        return self._failure(answer, opcode)

    def _io_result(self, op: _Op, answer: int | Packet) -> BlockResult:
        failed, transferred = self._outcome(answer, self._opcode(op))
        if failed is not None:
            return BlockResult(error=failed)
        if op.read_back:
            return BlockResult(data=bytes(self.ram.pages_view(op.pfn, op.owned_pages)[: min(transferred, op.length)]))
        return BlockResult()

    @staticmethod
    def _opcode(op: _Op) -> int:
        if op.command:
            return op.command[0][0]
        return S.Opcode.WRITE_16 if op.io and op.io[3] else S.Opcode.READ_16

    def _failure(self, pkt: Packet, opcode: int) -> tuple[BlockError | None, int]:
        operation, _, status, body = S.PACKET.unpack_from(bytes(pkt.payload).ljust(S.PACKET_SIZE, b"\0"))
        if operation != S.Operation.COMPLETE_IO or status != S.NtStatus.SUCCESS:
            return BlockError(f"request refused (NTSTATUS {status:#x})", status=status), 0
        srb = S.SCSI_REQUEST.unpack_from(body)
        srb_status, scsi_status, transferred, sense = srb[1], srb[2], srb[11], srb[12]
        if scsi_status != S.ScsiStatus.GOOD or (srb_status & 0x3F) != S.SrbStatus.SUCCESS:
            key = S.parse_sense(sense) if srb_status & S.SrbStatus.AUTOSENSE_VALID else None
            what = S.describe_sense(*key) if key else f"SRB status {srb_status:#x}"
            try:
                command = f"{S.Opcode(opcode).name} ({opcode:#04x})"
            except ValueError:
                command = f"{opcode:#04x}"
            return BlockError(f"SCSI {command} failed: {what}", sense=key), 0
        return None, transferred

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
        """The disk as an async file (see ``blockfile``)."""
        return BlockFile(self)

    def open_sync(self, buffer_size: int = io.DEFAULT_BUFFER_SIZE) -> io.BufferedRandom | io.BufferedReader:
        """The disk as a standard buffered blocking file, for a worker thread
        (``trio.to_thread.run_sync``); see ``blockfile``."""
        return open_sync(self, buffer_size)

