"""Guest halves of the integration services: heartbeat, shutdown, timesync.

Each driver answers the host's requests on its channel, one task per
device, as Linux's ``hv_util`` does: NEGOTIATE picks one framework and one
service version from the guest's own preference list
(``ic.choose_versions``); a service request gets its answer with the same
message type, versions and VMBus transaction id, flags TRANSACTION |
RESPONSE and a status.  A message that does not parse is dropped and
counted (Linux drops what is shorter than the header); a request for
another message type, or one that comes before negotiation, is answered
FAIL.

- ``HeartbeatDriver`` answers each beat with the sequence plus one.
- ``ShutdownDriver`` answers first, then sets ``requested`` (an event the
  launch code awaits to cancel the guest program and shut down cleanly);
  ``request`` says whether it was a reboot and whether forced.
- ``TimesyncDriver`` keeps the host's offset from the guest's wall clock:
  ``offset`` (seconds), ``now()`` (the corrected clock, Unix seconds),
  corrected for the time each sample spent in the ring by the partition
  reference counter it carries (versions >= 4.0).

The KVP driver is ``ic_kvp``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from ring import Packet, PacketType
from vmbus.channel import Channel
from vmbus.device import GuestDriver
from vmbus.errors import ChannelClosed, ChannelRevoked
from vmbus.protocols import ic

log = logging.getLogger(__name__)


class IcDriver(GuestDriver):
    """What every IC guest driver shares; subclasses write ``handle``."""

    NAME = "ic"
    MSGTYPE: ic.MsgType
    VERSIONS: tuple[ic.Version, ...] = ()
    MAX_MESSAGE = 4096  # Linux reads shutdown, timesync and heartbeat with a 4 KiB limit

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.framework: ic.Version | None = None
        self.version: ic.Version | None = None
        self.requests_answered = 0
        self.dropped = 0
        self._complained: set[str] = set()

    async def start(self, nursery: Any) -> None:
        nursery.start_soon(self._serve)

    def handle(self, msg: ic.IcMessage) -> tuple[int, bytes]:
        """(status, body) answering one request of the service's type."""
        raise NotImplementedError

    def answered(self, msg: ic.IcMessage, status: int) -> None:
        """Called once the answer to ``msg`` is sent."""

    def _drop(self, kind: str, why: str) -> None:
        self.dropped += 1
        if kind not in self._complained:
            self._complained.add(kind)
            log.warning("%s: dropped a message from the host: %s (further ones are counted only)", self.NAME, why)

    async def _serve(self) -> None:
        try:
            while True:
                for pkt in await self.channel.receive():
                    answer = self._answer(pkt)
                    if answer is None:
                        continue
                    msg, status, body = answer
                    await self.channel.send(ic.response(msg, status, body), trans_id=pkt.trans_id)
                    self.requests_answered += 1
                    self.answered(msg, status)
        except (ChannelClosed, ChannelRevoked):
            return

    def _answer(self, pkt: Packet) -> tuple[ic.IcMessage, int, bytes] | None:
        if pkt.type != PacketType.DATA_INBAND:
            self._drop("type", f"packet type {pkt.type:#x}")
            return None
        if len(pkt.payload) > self.MAX_MESSAGE:
            self._drop("size", f"{len(pkt.payload)} bytes (at most {self.MAX_MESSAGE})")
            return None
        try:
            msg = ic.parse_message(pkt.payload)
        except ic.IcFormatError as exc:
            self._drop("format", str(exc))
            return None
        if msg.msgtype == ic.MsgType.NEGOTIATE:
            choice = ic.choose_versions(ic.FRAMEWORK_VERSIONS_GUEST, self.VERSIONS, msg.body)
            self.framework, self.version = choice if choice else (None, None)
            if choice is None:
                log.warning("%s: the host offers no version this guest speaks", self.NAME)
            return msg, ic.Status.OK, ic.negotiate_answer(choice)
        if msg.msgtype != self.MSGTYPE or self.version is None:
            self._drop("unexpected", f"message type {msg.msgtype} (version {self.version})")
            return msg, ic.Status.FAIL, msg.body
        try:
            status, body = self.handle(msg)
        except ic.IcFormatError as exc:
            self._drop("body", str(exc))
            return msg, ic.Status.FAIL, msg.body
        return msg, status, body

    def statistics(self) -> dict[str, Any]:
        return {"framework": None if self.framework is None else str(self.framework),
                "version": None if self.version is None else str(self.version),
                "requests_answered": self.requests_answered, "dropped": self.dropped}


class HeartbeatDriver(IcDriver):
    NAME = "heartbeat"
    MSGTYPE = ic.MsgType.HEARTBEAT
    VERSIONS = ic.HEARTBEAT_VERSIONS[1]

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.sequence: int | None = None

    def handle(self, msg: ic.IcMessage) -> tuple[int, bytes]:
        self.sequence = ic.parse_heartbeat(msg.body)
        return ic.Status.OK, ic.heartbeat_answer(msg.body)


class ShutdownDriver(IcDriver):
    NAME = "shutdown"
    MSGTYPE = ic.MsgType.SHUTDOWN
    VERSIONS = ic.SHUTDOWN_VERSIONS[1]

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.requested = trio.Event()
        self.request: ic.ShutdownRequest | None = None

    def handle(self, msg: ic.IcMessage) -> tuple[int, bytes]:
        request = ic.parse_shutdown(msg.body)  # flags beyond power off / reboot: FAIL
        if self.request is None:
            self.request = request
        return ic.Status.OK, msg.body

    def answered(self, msg: ic.IcMessage, status: int) -> None:
        if status == ic.Status.OK and self.request is not None and not self.requested.is_set():
            log.info("shutdown: the host asks for a %s%s", "reboot" if self.request.reboot else "power off",
                     " (forced)" if self.request.force else "")
            self.requested.set()


class TimesyncDriver(IcDriver):
    NAME = "timesync"
    MSGTYPE = ic.MsgType.TIMESYNC
    VERSIONS = ic.TIMESYNC_VERSIONS[1]

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.offset_ns = 0  # host clock minus guest wall clock
        self.samples = 0
        self.synced = trio.Event()  # set by the first sample

    def handle(self, msg: ic.IcMessage) -> tuple[int, bytes]:
        assert self.version is not None
        sample = ic.parse_timesync(msg.body, self.version)
        # Both local clocks read together; the host's time now is its sample
        # plus what the reference counter says passed since it was taken.
        wall, reference = ic.read_clocks()
        host_now = sample.parent_time
        if sample.reference_time is not None:
            host_now += max(0, reference - sample.reference_time)
        self.offset_ns = ic.wintime_to_unix_ns(host_now) - wall
        self.samples += 1
        self.synced.set()
        return ic.Status.OK, msg.body

    @property
    def offset(self) -> float:
        """The host's clock minus this guest's wall clock, in seconds."""
        return self.offset_ns / 1e9

    def now_ns(self) -> int:
        return time.time_ns() + self.offset_ns

    def now(self) -> float:
        """The host's time as of the last sample: Unix seconds."""
        return self.now_ns() / 1e9
