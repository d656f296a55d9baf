"""What every integration service's host half shares: negotiation and transactions.

An IC channel is host-request / guest-response (ic-reference.md section 1).
``IcHost.serve`` sends NEGOTIATE as soon as the guest opens the channel,
checks that the guest picked one framework and one service version from
the host's own lists, then runs the service (``run``).  Requests go out one
at a time (``transact`` holds a lock) with a timeout; each carries its own
VMBus transaction id, so an answer that comes after its request timed out
is recognised as stale and dropped.

Everything the guest sends is hostile: one reader task parses each packet
(``vmbus.protocols.ic``) and hands it to the one outstanding request only
if it is a well-formed response of the same message type and id.  What is
refused (malformed messages, requests from the guest, answers to nothing,
floods of any of them) is counted per kind in ``counters`` and logged once
per kind, never answered, and costs the host nothing more than reading it.

Requests are written straight into the ring and never wait for room: the
reader task is the one that sleeps on the channel's doorbell, and a guest
that does not read its ring gets ``IcUnavailable`` instead of a blocked
host.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import trio

from ring import Packet, PacketType, RingFull
from vmbus.channel import Channel
from vmbus.device import DeviceCommandError, HostDevice
from vmbus.guest_memory import GuestMemory
from vmbus.protocols import ic

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 10.0  # seconds a guest has to answer one request
MAX_TRANS_ID = (1 << 64) - 1


class IcError(DeviceCommandError):
    """A request that did not get a good answer; the text says why, in one line."""


class IcUnavailable(IcError):
    """The channel is not open and negotiated, or the guest does not read its ring."""


class IcTimeout(IcError):
    """The guest did not answer in time."""


class IcRefused(IcError):
    """The guest answered with a failure status."""


@dataclass
class _Pending:
    msgtype: int
    trans_id: int
    done: trio.Event = field(default_factory=trio.Event)
    answer: ic.IcMessage | None = None


def positive_seconds(config: dict[str, Any], key: str, default: float) -> float:
    """A configured interval or timeout: a finite number of seconds above 0."""
    value = config.get(key, default)
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number of seconds, not {value!r}")
    return float(value)


def check_arguments(args: dict[str, Any], schema: dict[str, type], required: tuple[str, ...] = ()) -> None:
    """An admin command's arguments: only the keys in ``schema``, each of
    exactly its type (a bool is not an int), the ``required`` ones present."""
    if not isinstance(args, dict):
        raise DeviceCommandError("arguments must be an object")
    unknown = sorted(set(args) - set(schema))
    if unknown:
        raise DeviceCommandError(f"unknown argument(s): {', '.join(unknown)}")
    for key in required:
        if key not in args:
            raise DeviceCommandError(f"{key!r} is missing")
    for key, value in args.items():
        if type(value) is not schema[key]:
            raise DeviceCommandError(f"{key!r} must be a {schema[key].__name__}")


class IcHost(HostDevice):
    """Host half of one integration service; subclasses set the class
    attributes and write ``run`` (the service once negotiated)."""

    NAME = "ic"
    MSGTYPE: ic.MsgType
    VERSIONS: tuple[ic.Version, ...] = ()

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.timeout = positive_seconds(config, "timeout", DEFAULT_TIMEOUT)
        self.state = "closed"  # closed -> negotiating -> ready, or incompatible
        self.framework: ic.Version | None = None
        self.version: ic.Version | None = None
        self.counters = {"bad_messages": 0, "unsolicited": 0, "timeouts": 0, "failed": 0}
        self._complained: set[str] = set()
        self._channel: Channel | None = None
        self._pending: _Pending | None = None
        self._lock = trio.Lock()
        self._trans_ids = itertools.count(1)

    # -- what subclasses write --------------------------------------------------

    async def run(self) -> None:
        """The service once negotiated (periodic requests); may return."""

    def service_snapshot(self) -> dict[str, Any]:
        return {}

    # -- the channel ------------------------------------------------------------

    async def serve(self, channel: Channel, memory: GuestMemory) -> None:
        self._channel = channel
        self.framework = self.version = None
        self.state = "negotiating"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, channel)
                try:
                    if await self._negotiate():
                        await self.run()
                except IcUnavailable as exc:
                    # The guest closed the channel (or stopped reading it) while
                    # a request was out: the service is over, the channel's end
                    # is the bus's business.  Raised on, it would meet the
                    # channel's cancellation in one group and end the partition.
                    log.info("%s (channel %d): %s", self.NAME, self._relid(), exc)
                await trio.sleep_forever()  # keep reading (and refusing) until the channel goes
        finally:
            self._channel = None
            self.state = "closed"
            if self._pending is not None:
                self._pending.done.set()  # its waiter finds no answer: IcUnavailable

    async def _negotiate(self) -> bool:
        body = ic.encode_negotiate(ic.FRAMEWORK_VERSIONS_HOST, self.VERSIONS)
        # A guest may leave negotiation unanswered for as long as it likes
        # (Linux's KVP does until its daemon registers): no timeout here.
        answer = await self.transact(ic.MsgType.NEGOTIATE, body, timeout=None)
        try:
            self.framework, self.version = ic.parse_negotiate_answer(
                answer.body, ic.FRAMEWORK_VERSIONS_HOST, self.VERSIONS)
        except ic.IcFormatError as exc:
            self.state = "incompatible"
            log.warning("%s (channel %d): negotiation failed, service off: %s", self.NAME,
                        self._relid(), exc)
            return False
        self.state = "ready"
        log.info("%s (channel %d): framework %s, version %s", self.NAME, self._relid(), self.framework, self.version)
        return True

    def _relid(self) -> int:
        return self._channel.relid if self._channel is not None else 0

    def refuse(self, kind: str, why: str) -> None:
        """Count a refused message; log the first of each kind only (a flood
        costs one line)."""
        self.counters[kind] = self.counters.get(kind, 0) + 1
        if kind not in self._complained:
            self._complained.add(kind)
            log.warning("%s (channel %d): %s (further ones are counted, not logged)", self.NAME, self._relid(), why)

    async def _read(self, channel: Channel) -> None:
        while True:
            for pkt in await channel.receive():
                self._on_packet(pkt)

    def _on_packet(self, pkt: Packet) -> None:
        if pkt.type != PacketType.DATA_INBAND:
            self.refuse("bad_messages", f"packet type {pkt.type:#x} from the guest, not in-band data")
            return
        try:
            msg = ic.parse_message(pkt.payload)
        except ic.IcFormatError as exc:
            self.refuse("bad_messages", f"malformed message from the guest: {exc}")
            return
        if not msg.is_response or msg.transaction_id != 0:
            self.refuse("bad_messages", f"message from the guest with flags {msg.flags:#x} and ICMSG "
                                        f"transaction {msg.transaction_id}: not a response")
            return
        pending = self._pending
        if pending is None or pending.answer is not None or pending.msgtype != msg.msgtype \
                or pending.trans_id != pkt.trans_id:
            self.refuse("unsolicited", f"answer (type {msg.msgtype}, id {pkt.trans_id}) to no outstanding request")
            return
        pending.answer = msg
        pending.done.set()

    # -- transactions -----------------------------------------------------------------

    @property
    def outstanding(self) -> int | None:
        """The VMBus transaction id of the request in flight, if any."""
        return None if self._pending is None else self._pending.trans_id

    async def transact(self, msgtype: int, body: bytes, *, timeout: float | None = None) -> ic.IcMessage:
        """Send one request and return the guest's answer (any status).
        One at a time; ``timeout`` None waits until the channel goes."""
        async with self._lock:
            channel = self._channel
            if channel is None or (msgtype != ic.MsgType.NEGOTIATE and self.state != "ready"):
                raise IcUnavailable(f"the guest's {self.NAME} service is {self.state}")
            pending = _Pending(msgtype, next(self._trans_ids) & MAX_TRANS_ID)
            payload = ic.encode_message(msgtype, body, framework=self.framework or ic.NO_VERSION,
                                        version=self.version or ic.NO_VERSION)
            self._pending = pending
            try:
                self._send_now(channel, payload, pending.trans_id)
                with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                    await pending.done.wait()
            finally:
                self._pending = None
            if scope.cancelled_caught:
                self.counters["timeouts"] += 1
                raise IcTimeout(f"the guest did not answer its {self.NAME} request within {timeout:g} s")
            if pending.answer is None:
                raise IcUnavailable(f"the guest's {self.NAME} channel closed")
            return pending.answer

    async def request(self, msgtype: int, body: bytes) -> ic.IcMessage:
        """``transact`` with the service's timeout, an answer with status OK or ``IcRefused``."""
        answer = await self.transact(msgtype, body, timeout=self.timeout)
        if answer.status != ic.Status.OK:
            self.counters["failed"] += 1
            raise IcRefused(f"the guest refused the {self.NAME} request: {ic.status_name(answer.status)}")
        return answer

    def _send_now(self, channel: Channel, payload: bytes, trans_id: int) -> None:
        """Publish one request without waiting for room (the reader task
        owns the doorbell; a full ring means the guest is not reading)."""
        if not channel.active:
            raise IcUnavailable(f"the guest's {self.NAME} channel closed")
        try:
            channel.outgoing.write(payload, trans_id=trans_id, packet_type=PacketType.DATA_INBAND)
        except RingFull:
            raise IcUnavailable(f"the guest is not reading its {self.NAME} ring (it is full)") from None
        channel.stats.packets_sent += 1
        channel.commit_write()

    # -- inspect ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "framework": None if self.framework is None else str(self.framework),
            "version": None if self.version is None else str(self.version),
            "counters": dict(self.counters),
            **self.service_snapshot(),
        }
