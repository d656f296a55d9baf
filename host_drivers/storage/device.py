"""The storvsp: the host half of the paravirtual SCSI disk.

Each channel (the primary and every sub-channel) runs ``serve``.  Regular
reads and writes go to the C fast path (``fastpath``: a worker thread per
channel, no Python per request).  Everything else comes back here, one
request at a time: validate it, run its SCSI command in a worker thread
(file I/O never blocks the event loop; data moves by preadv/pwritev
straight between the image and guest RAM), and send the completion.  The
primary channel first walks the storvsc initialisation in Python
(BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION, QUERY_PROPERTIES,
END_INITIALIZATION), batch by batch; it serves CREATE_SUB_CHANNELS by
asking the bus to offer more channels.  With ``fast_path`` off, every
request takes the Python path, in batches.

What the guest sends is untrusted (openvmm storvsp's parse_packet is the
model): a request must ask for a completion; EXECUTE_SRB must carry a full
52-byte SRB with a CDB of at most 16 bytes and a transfer no larger than
advertised; a transfer must arrive as exactly one GPA-direct range whose
length covers it and whose pages lie in guest RAM.  A malformed request
is answered with an NTSTATUS error; nothing it names is touched.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from ring import Packet, PacketType
from vmbus.channel import Channel
from vmbus.device import HostDevice
from vmbus.guest_memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from vmbus.protocols import storvsc as S

from . import scsi
from .backend import DiskImage
from .fastpath import DEFAULT_POLL_US, FastPath, NoQueueThread

log = logging.getLogger(__name__)
DEFAULT_MAX_TRANSFER = 1 << 20
DEFAULT_SUBCHANNELS = 3
GPA_HEAD = struct.Struct("<II")  # reserved, range count


@dataclass
class _Job:
    trans_id: int
    srb: tuple[Any, ...]
    iov: list[memoryview]
    result: scsi.ScsiResult | None = None


class StorvspHost(HostDevice):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.max_transfer = int(config.get("max_transfer", DEFAULT_MAX_TRANSFER))
        if not 0 < self.max_transfer <= S.MAX_TRANSFER or self.max_transfer % PAGE_SIZE:
            raise ValueError(f"storage max_transfer {self.max_transfer} must be a multiple of {PAGE_SIZE} "
                             f"from {PAGE_SIZE} to {S.MAX_TRANSFER} bytes (the most its C paths take)")
        self.disk = DiskImage(
            str(config["path"]), size=config.get("size"), read_only=bool(config.get("read_only", False))
        )
        self.max_subchannels = int(config.get("subchannels", DEFAULT_SUBCHANNELS))
        self.errors: Counter[str] = Counter()
        # Regular reads and writes are served in C (``fastpath``) unless
        # ``fast_path`` is false; ``poll_us``: how long its thread polls for
        # the next request before sleeping on the channel's eventfd.
        self.use_fast_path = bool(config.get("fast_path", True))
        self.poll_us = int(config.get("poll_us", DEFAULT_POLL_US))
        self.fast_paths: dict[int, FastPath] = {}  # by relid, while served in C

    def snapshot(self) -> dict[str, Any]:
        """For ``pvbus inspect``: each queue served in C with its queue-layer
        counters (served, punted, publishes, signals, wakeups, sleeps,
        polls_hit, ring_full_waits) and the disk's (requests, bytes), and the
        requests refused in Python by reason."""
        return {
            "queues": [{"relid": relid, "sub_channel": fast.channel.sub_index, **fast.statistics()}
                       for relid, fast in sorted(self.fast_paths.items())],
            "refused": dict(self.errors),
        }

    async def close(self) -> None:
        self.disk.close()

    # -- the per-channel loop ---------------------------------------------

    async def serve(self, channel: Channel, memory: GuestMemory) -> None:
        initialised = channel.sub_index > 0  # sub-channels need no handshake
        fast = self._fast_path(channel, memory)
        if fast is not None:
            self.fast_paths[channel.relid] = fast
        try:
            while True:
                limit = 128
                if initialised and fast is not None:
                    await fast.run()  # back here when a request needs Python
                    limit = 1  # just that one, then C again
                initialised = await self._serve_batch(channel, memory, initialised, limit)
        finally:
            if fast is not None:
                self.fast_paths.pop(channel.relid, None)
                fast.close()

    def _fast_path(self, channel: Channel, memory: GuestMemory) -> FastPath | None:
        if not self.use_fast_path or channel.event_fd is None or not hasattr(channel.incoming, "c_address"):
            return None
        try:
            return FastPath(channel, memory, self.disk, self.max_transfer, self.poll_us)
        except NoQueueThread as exc:
            log.warning("storvsp: channel %d served in Python: %s", channel.relid, exc)
            return None

    async def _serve_batch(self, channel: Channel, memory: GuestMemory, initialised: bool, limit: int) -> bool:
        """Take up to ``limit`` requests and answer them in Python; returns
        whether the channel is initialised afterwards."""
        replies: list[tuple[Any, int, bool, int, bytes]] = []
        jobs: list[_Job] = []
        for pkt in await channel.receive(limit=limit):
            out = self._request(pkt, memory, initialised, jobs, channel)
            if out is None:
                continue
            if out == "initialised":
                initialised = True
                out = S.packet(S.Operation.COMPLETE_IO)
            replies.append((out, pkt.trans_id, False, PacketType.COMPLETION, b""))
        if jobs:
            await trio.to_thread.run_sync(self._run_jobs, jobs)
            for job in jobs:
                replies.append((self._completion(job), job.trans_id, False, PacketType.COMPLETION, b""))
        if replies:
            await channel.send_many(replies)
        return initialised

    def _refuse(self, what: str, status: int = S.NtStatus.INVALID_PARAMETER) -> bytes:
        self.errors[what] += 1
        log.warning("storvsp: refused request: %s", what)
        return S.packet(S.Operation.COMPLETE_IO, status)

    def _request(
        self, pkt: Packet, memory: GuestMemory, initialised: bool, jobs: list[_Job], channel: Channel
    ) -> bytes | str | None:
        if not pkt.completion_requested or pkt.type not in (PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT):
            self.errors["not transactional"] += 1
            return None  # nothing to answer to
        payload = bytes(pkt.payload)
        if len(payload) < 12:
            return self._refuse("short packet")
        operation, _, _ = struct.unpack_from("<III", payload)
        body = payload[12:64].ljust(52, b"\0")
        if operation == S.Operation.EXECUTE_SRB:
            if not initialised:
                return self._refuse("I/O before initialisation", S.NtStatus.INVALID_DEVICE_STATE)
            if len(payload) < S.PACKET_SIZE:
                return self._refuse("truncated SRB")
            return self._execute(pkt, body, memory, jobs)
        if operation == S.Operation.BEGIN_INITIALIZATION:
            return S.packet(S.Operation.COMPLETE_IO)
        if operation == S.Operation.QUERY_PROTOCOL_VERSION:
            (version, _) = S.PROTOCOL_VERSION.unpack_from(body)
            if version not in S.ProtocolVersion._value2member_map_:
                return S.packet(S.Operation.COMPLETE_IO, S.NtStatus.REVISION_MISMATCH)
            return S.packet(S.Operation.COMPLETE_IO)
        if operation == S.Operation.QUERY_PROPERTIES:
            props = S.PROPERTIES.pack(0, self.max_subchannels, 0, S.SUPPORTS_MULTI_CHANNEL, self.max_transfer, 0)
            return S.packet(S.Operation.COMPLETE_IO, 0, props)
        if operation == S.Operation.END_INITIALIZATION:
            return "initialised"
        if operation == S.Operation.CREATE_SUB_CHANNELS:
            (count,) = S.SUB_CHANNEL_COUNT.unpack_from(body)
            if not initialised or channel.request_subchannels is None or count > self.max_subchannels:
                return self._refuse("bad CREATE_SUB_CHANNELS")
            offered = channel.request_subchannels(count)
            return S.packet(S.Operation.COMPLETE_IO, 0, S.SUB_CHANNEL_COUNT.pack(offered))
        return self._refuse(f"unknown operation {operation}", S.NtStatus.INVALID_DEVICE_REQUEST)

    def _execute(self, pkt: Packet, body: bytes, memory: GuestMemory, jobs: list[_Job]) -> bytes | None:
        srb = S.SCSI_REQUEST.unpack_from(body)
        cdb_len, transfer = srb[7], srb[11]
        if cdb_len == 0 or cdb_len > 16:
            return self._refuse(f"CDB length {cdb_len}")
        if transfer > self.max_transfer:
            return self._refuse(f"transfer of {transfer} bytes beyond {self.max_transfer}")
        if srb[4] or srb[5] or srb[6]:  # path, target, lun: one disk at 0:0:0
            return S.packet(S.Operation.COMPLETE_IO, 0, self._srb_reply(srb, S.SrbStatus.INVALID_LUN, 0, None, 0))
        iov: list[memoryview] = []
        if transfer:
            if pkt.type != PacketType.DATA_USING_GPA_DIRECT:
                return self._refuse("data transfer without a page list")
            try:
                iov = self._pages(bytes(pkt.header), transfer, memory)
            except (ValueError, GuestMemoryError) as exc:
                return self._refuse(f"page list: {exc}")
        jobs.append(_Job(pkt.trans_id, srb, iov))
        return None

    def _pages(self, header: bytes, transfer: int, memory: GuestMemory) -> list[memoryview]:
        """The single GPA range of a request, as views of guest RAM."""
        if len(header) < GPA_HEAD.size + 8:
            raise ValueError("no range")
        _, count = GPA_HEAD.unpack_from(header)
        if count != 1:
            raise ValueError(f"{count} ranges (exactly one expected)")
        byte_count, byte_offset = struct.unpack_from("<II", header, GPA_HEAD.size)
        if byte_count < transfer or byte_offset >= PAGE_SIZE:
            raise ValueError(f"range of {byte_count} bytes at offset {byte_offset} for a {transfer}-byte transfer")
        pages = (byte_offset + transfer + PAGE_SIZE - 1) // PAGE_SIZE
        have = (len(header) - GPA_HEAD.size - 8) // 8
        if have < pages:
            raise ValueError(f"range needs {pages} pages, {have} present")
        pfns = struct.unpack_from(f"<{pages}Q", header, GPA_HEAD.size + 8)
        return memory.iovec(pfns, byte_offset, transfer)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Worker thread: the batch's SCSI commands, in order."""
        for job in jobs:
            cdb = job.srb[12][:16]
            job.result = scsi.execute(self.disk, cdb, job.srb[9] == S.DATA_IN, job.iov, job.srb[11])

    @staticmethod
    def _srb_reply(srb: tuple[Any, ...], srb_status: int, scsi_status: int,
                   sense: tuple[int, int, int] | None, transferred: int) -> bytes:
        sense_bytes = S.fixed_sense(*sense) if sense else bytes(S.SENSE_SIZE)
        if sense:
            srb_status |= S.SrbStatus.AUTOSENSE_VALID
        fields = list(srb)
        fields[1], fields[2] = srb_status, scsi_status
        fields[8] = S.SENSE_SIZE if sense else 0
        fields[11] = transferred
        fields[12] = sense_bytes
        return S.SCSI_REQUEST.pack(*fields)

    def _completion(self, job: _Job) -> bytes:
        r = job.result
        assert r is not None
        srb_status = S.SrbStatus.SUCCESS if r.status == S.ScsiStatus.GOOD else S.SrbStatus.ERROR
        return S.packet(S.Operation.COMPLETE_IO, 0, self._srb_reply(job.srb, srb_status, r.status, r.sense,
                                                                    r.transferred))
