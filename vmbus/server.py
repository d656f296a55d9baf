"""The host side of the VMBus control protocol, one instance per partition.

It keeps an explicit state per channel and per GPADL, validates every
message the guest posts, and answers with an HV_STATUS (returned as the
HvPostMessage result) plus, where the protocol has one, a response
message with a failure status (GPADL_CREATED, OPENCHANNEL_RESULT).  What
it refuses (reference section 8.2, after openvmm's vmbus_server): an
unknown or wrong-state relid, an unknown, duplicate or still-assembling
GPADL id, a body for no GPADL or beyond the declared length, a PFN outside
guest RAM, a ring GPADL that is not one contiguous run or a downstream
offset that does not split it into two rings, opening an open channel,
a second REQUESTOFFERS, and any message before contact or on the wrong
connection id.  Every refusal is logged and counted; the partition keeps
running.

Channel states: OFFERED -> OPEN -> (CLOSECHANNEL) OFFERED, or any ->
RESCINDED -> (RELID_RELEASED) gone.  An open channel has a worker task in
the partition's nursery running the device's ``serve``.

What a guest makes the host hold is bounded (``vmbus.limits``): GPADLs,
their pages (kept as 8 bytes a page), open channels and the messages
queued for it, per partition and across the host; a request beyond a cap
is refused like any other bad request.  Everything is given back on every
way out: CLOSECHANNEL, rescind then RELID_RELEASED (a released device is
closed once every worker using it has returned: a storage worker's thread
may still be using the disk's fd until then), UNLOAD, and ``close`` when
the partition goes (guest gone, killed, or host shutdown), which closes
every device, released or not.
"""

from __future__ import annotations

import array
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from ring import Doorbell, IncomingRing, OutgoingRing, RingError

from . import hv
from . import protocol as P
from .channel import Channel
from .device import DeviceSpec, HostDevice, HostPlace
from .guest_memory import PAGE_SHIFT, GuestMemoryError
from .hypervisor import Partition
from .limits import Limits

log = logging.getLogger(__name__)

HOST_VERSIONS = (
    P.Version.WIN10_V5_3, P.Version.WIN10_V5_2, P.Version.WIN10_V5_1, P.Version.WIN10_V5,
    P.Version.WIN10_V4_1, P.Version.WIN10, P.Version.WIN8_1,
)
NEGOTIATED_CONN_ID_V5 = 4  # what we hand out as msg_conn_id at >= 5.0
MAX_SUBCHANNELS = 16
MAX_RELID = 0xFFF  # a relid is the low 12 bits of its connection id
MAX_GPADLS = Limits().gpadls  # per partition (the caps: ``vmbus.limits``)


class ChannelState(enum.Enum):
    OFFERED = "offered"
    OPEN = "open"
    RESCINDED = "rescinded"


@dataclass(slots=True)
class Gpadl:
    gpadl_id: int
    relid: int
    total: int
    byte_count: int
    byte_offset: int
    pfns: array.array[int] = field(default_factory=lambda: array.array("Q"))  # 8 bytes a page

    @property
    def complete(self) -> bool:
        return len(self.pfns) == self.total


@dataclass
class HostChannel:
    relid: int
    spec: DeviceSpec
    instance: uuid.UUID
    device: HostDevice
    state: ChannelState = ChannelState.OFFERED
    ring_gpadl: int | None = None
    channel: Channel | None = None
    doorbell: Doorbell | None = None
    scope: trio.CancelScope | None = None
    guest_signals: int = 0
    sub_index: int = 0  # 0: primary; >= 1: a sub-channel of the primary with the same instance
    primary: int = 0  # relid of the primary (itself for a primary)
    worker_done: trio.Event | None = None  # set when the open channel's worker has returned
    # A channel a device offered at run time (``offer_channel``): its own
    # GUIDs, flags and user-defined area, served by its own ``serve``.
    interface: uuid.UUID | None = None
    flags: int = 0
    user_defined: bytes = b""
    serve: Callable[[Channel], Awaitable[None]] | None = None

    @property
    def connection_id(self) -> int:
        # openvmm ConnectionId::new: channel id | sint << 12
        return self.relid | (hv.VMBUS_MESSAGE_SINT << 12)


class Refused(Exception):
    """A guest message we refuse; carries the hypercall status to return."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(what)
        self.status = status


class VmbusServer:
    def __init__(
        self,
        partition: Partition,
        devices: Iterable[DeviceSpec],
        nursery: trio.Nursery,
        versions: Iterable[int] = HOST_VERSIONS,
        device_config: dict[str, dict[str, Any]] | None = None,
        host_socket: str | None = None,
        access: Any = None,
    ) -> None:
        self.partition = partition
        self.nursery = nursery
        self.versions = frozenset(int(v) for v in versions)
        self.version: int | None = None
        self.msg_conn_id = hv.VMBUS_MESSAGE_CONNECTION_ID
        self.offers_sent = False
        self.channels: dict[int, HostChannel] = {}
        self.gpadls: dict[int, Gpadl] = {}
        self.assembling: dict[int, Gpadl] = {}
        self.limits = partition.limits
        self.budget = partition.budget
        self.gpadl_pages = 0  # declared pages of every GPADL held or assembling
        self.open_channels = 0
        config = device_config or {}
        self.devices: list[HostDevice] = []  # every device made for this partition, to close
        self._closed_devices: set[int] = set()  # ids of those closed already
        for relid, spec in enumerate(devices, start=1):
            self.channels[relid] = HostChannel(
                relid, spec, uuid.uuid5(spec.interface_id, f"partition-{partition.id}-{relid}"),
                spec.host(config.get(spec.name, {})), primary=relid,
            )
            self.devices.append(self.channels[relid].device)
            self.channels[relid].device.place = HostPlace(partition.id, host_socket, access)
        self._next_relid = len(self.channels) + 1
        # What each guest-to-host message does once contact is made (the
        # rest of the protocol's messages are host-to-guest: refused).
        self._handlers: dict[type[P.Message], Callable[[Any], None]] = {
            P.RequestOffers: self._on_requestoffers,
            P.GpadlHeader: self._on_gpadl_header,
            P.GpadlBody: self._on_gpadl_body,
            P.GpadlTeardown: self._on_gpadl_teardown,
            P.OpenChannel: self._on_openchannel,
            P.CloseChannel: self._on_closechannel,
            P.RelidReleased: self._on_relid_released,
            P.Unload: self._on_unload,
        }
        partition.on_message = self.handle
        partition.event_port = self._event_port
        partition.on_signal = self._slow_signal

    # -- entry point -------------------------------------------------------

    def handle(self, conn_id: int, data: bytes) -> int:
        """One posted message; returns the HvPostMessage status."""
        try:
            msg = P.decode(data)
        except P.ProtocolError as exc:
            self.partition.reject("message", str(exc))
            return hv.HvStatus.INVALID_PARAMETER
        try:
            if isinstance(msg, P.InitiateContact):
                return self._initiate_contact(conn_id, msg)
            if self.version is None:
                raise Refused(hv.HvStatus.INVALID_PARTITION_STATE, f"{msg.TYPE.name} before contact")
            if conn_id != self.msg_conn_id:
                raise Refused(hv.HvStatus.INVALID_CONNECTION_ID, f"message on connection id {conn_id}")
            handler = self._handlers.get(type(msg))
            if handler is None:
                raise Refused(hv.HvStatus.INVALID_PARAMETER, f"{msg.TYPE.name} is not a guest-to-host message")
            answers = len(self.channels) + 1 if isinstance(msg, P.RequestOffers) else 1
            if not self.partition.message_room(answers):
                raise Refused(hv.HvStatus.INSUFFICIENT_BUFFERS, f"{self.limits.queued_messages} messages "
                              "queued for the guest (the cap); consume them first")
            handler(msg)
            return hv.HvStatus.SUCCESS
        except Refused as exc:
            self.partition.reject(msg.TYPE.name, str(exc))
            return exc.status

    def _send(self, msg: P.Message) -> None:
        self.partition.post(msg.encode())

    # -- connect and enumerate ---------------------------------------------

    def _initiate_contact(self, conn_id: int, msg: P.InitiateContact) -> int:
        new_style = msg.version_requested >= P.CONNECTION_ID_CHANGE
        expected = hv.VMBUS_MESSAGE_CONNECTION_ID_4 if new_style else hv.VMBUS_MESSAGE_CONNECTION_ID
        # A host that supports nothing from 5.0 on does not know connection
        # id 4 at all: the post itself fails, as on an old Hyper-V host.
        if conn_id == hv.VMBUS_MESSAGE_CONNECTION_ID_4 and max(self.versions) < P.CONNECTION_ID_CHANGE:
            raise Refused(hv.HvStatus.INVALID_CONNECTION_ID, "connection id 4 unknown to this host")
        if conn_id != expected:
            raise Refused(hv.HvStatus.INVALID_CONNECTION_ID, f"INITIATE_CONTACT on connection id {conn_id}")
        if any(ch.state is ChannelState.OPEN for ch in self.channels.values()):
            raise Refused(hv.HvStatus.INVALID_PARTITION_STATE, "INITIATE_CONTACT with channels open")
        if msg.version_requested not in self.versions:
            self._send(P.VersionResponse(0, 0, 0, 0))
            return hv.HvStatus.SUCCESS
        self.version = msg.version_requested
        self.msg_conn_id = NEGOTIATED_CONN_ID_V5 if new_style else hv.VMBUS_MESSAGE_CONNECTION_ID
        self.offers_sent = False
        log.info("partition %d: version %#x negotiated", self.partition.id, self.version)
        self._send(P.VersionResponse(1, 0, 0, self.msg_conn_id if new_style else 0))
        return hv.HvStatus.SUCCESS

    def _on_requestoffers(self, msg: P.RequestOffers) -> None:
        if self.offers_sent:
            raise Refused(hv.HvStatus.INVALID_PARTITION_STATE, "second REQUESTOFFERS")
        self.offers_sent = True
        for ch in self.channels.values():
            if ch.state is not ChannelState.RESCINDED:
                self._send(self._offer(ch))
        self._send(P.AllOffersDelivered())

    def _offer(self, ch: HostChannel) -> P.OfferChannel:
        return P.OfferChannel(
            if_type=P.guid_to_wire(ch.interface or ch.spec.interface_id), if_instance=P.guid_to_wire(ch.instance),
            chn_flags=ch.flags, user_defined=ch.user_defined.ljust(120, b"\0"),
            sub_channel_index=ch.sub_index, child_relid=ch.relid, connection_id=ch.connection_id,
        )

    def offer_channel(self, owner: int, interface: uuid.UUID, instance: uuid.UUID,
                      serve: Callable[[Channel], Awaitable[None]],
                      *, flags: int = 0, user_defined: bytes = b"") -> int | None:
        """Offer a channel of an open primary's device at run time (a
        connection of the sockets device, say) with its own GUIDs, flags and
        user-defined area; ``serve`` runs when the guest opens it, as
        ``HostDevice.serve`` does for the primary.  Returns its relid, or
        None when the owner is not open or no relid is free.  It ends as any
        channel does: ``rescind_channel`` (the device's), the owner's rescind,
        or the partition going.  Devices call this through the primary's
        ``Channel.offer_channel``."""
        ch = self.channels.get(owner)
        if ch is None or ch.state is not ChannelState.OPEN or ch.primary != owner or len(user_defined) > 120:
            return None
        # Round robin over the free relids: a relid just released is the
        # last to be offered again (late messages about it stay unambiguous).
        start = self._next_relid
        order = (*range(start, MAX_RELID + 1), *range(1, start))
        relid: int | None = next((r for r in order if r not in self.channels), None)
        if relid is None:
            return None
        self._next_relid = relid % MAX_RELID + 1
        extra = HostChannel(relid, ch.spec, instance, ch.device, primary=owner, interface=interface, flags=flags,
                            user_defined=user_defined, serve=serve)
        self.channels[relid] = extra
        self._send(self._offer(extra))
        return relid

    def rescind_owned(self, owner: int, relid: int) -> None:
        """Rescind a channel ``offer_channel`` made for ``owner`` (and no other)."""
        ch = self.channels.get(relid)
        if ch is not None and ch.primary == owner and ch.relid != owner and ch.state is not ChannelState.RESCINDED:
            self.rescind(relid)

    def offer_subchannels(self, primary: int, count: int) -> int:
        """Offer up to ``count`` more channels of an open primary (same GUIDs,
        sub_channel_index >= 1); returns how many were offered.  Devices call
        this through ``Channel.request_subchannels``."""
        ch = self.channels.get(primary)
        if ch is None or ch.state is not ChannelState.OPEN or ch.sub_index:
            return 0
        existing = sum(1 for c in self.channels.values() if c.primary == primary and c.sub_index)
        offered = 0
        for index in range(existing + 1, min(existing + count, MAX_SUBCHANNELS) + 1):
            relid = self._next_relid
            self._next_relid += 1
            sub = HostChannel(relid, ch.spec, ch.instance, ch.device, sub_index=index, primary=primary)
            self.channels[relid] = sub
            self._send(self._offer(sub))
            offered += 1
        return offered

    # -- GPADLs --------------------------------------------------------------

    def _channel(self, relid: int, *states: ChannelState) -> HostChannel:
        ch = self.channels.get(relid)
        if ch is None:
            raise Refused(hv.HvStatus.INVALID_PARAMETER, f"unknown relid {relid}")
        if states and ch.state not in states:
            raise Refused(hv.HvStatus.INVALID_PARAMETER, f"relid {relid} is {ch.state.value}")
        return ch

    def _gpadl_failed(self, relid: int, gpadl: int, why: str) -> Refused:
        self._send(P.GpadlCreated(relid, gpadl, P.STATUS_UNSUCCESSFUL))
        return Refused(hv.HvStatus.INVALID_PARAMETER, why)

    def _check_pfns(self, pfns: Iterable[int]) -> None:
        for pfn in pfns:
            self.partition.memory.check_pfn(pfn)

    def _on_gpadl_header(self, msg: P.GpadlHeader) -> None:
        relid, gid = msg.child_relid, msg.gpadl
        if relid not in self.channels or self.channels[relid].state is ChannelState.RESCINDED:
            raise self._gpadl_failed(relid, gid, f"GPADL for unknown relid {relid}")
        if gid in self.gpadls or gid in self.assembling:
            raise Refused(hv.HvStatus.INVALID_PARAMETER, f"duplicate GPADL id {gid:#x}")
        if len(self.gpadls) + len(self.assembling) >= self.limits.gpadls:
            raise self._gpadl_failed(relid, gid, f"{self.limits.gpadls} GPADLs held (the cap)")
        total = msg.total_pfns
        pages = (msg.byte_offset + msg.byte_count + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        if (
            msg.range_buflen != P.GPA_RANGE_HEAD.size + 8 * total
            or total == 0
            or msg.byte_count == 0
            or msg.byte_offset >= 1 << PAGE_SHIFT
            or pages != total
            or total > self.partition.memory.pages
        ):
            raise self._gpadl_failed(relid, gid, f"bad range: {total} pages for {msg.byte_count} bytes")
        try:
            self._check_pfns(msg.pfns)
        except GuestMemoryError as exc:
            raise self._gpadl_failed(relid, gid, str(exc)) from None
        if self.gpadl_pages + total > self.limits.gpadl_pages:
            raise self._gpadl_failed(relid, gid, f"GPADLs of more than {self.limits.gpadl_pages} pages (the cap)")
        if not self.budget.take("gpadl_pages", total):
            raise self._gpadl_failed(relid, gid, "host-wide cap of GPADL pages reached")
        self.gpadl_pages += total
        g = Gpadl(gid, relid, total, msg.byte_count, msg.byte_offset, array.array("Q", msg.pfns))
        self._gpadl_progress(g)

    def _on_gpadl_body(self, msg: P.GpadlBody) -> None:
        g = self.assembling.get(msg.gpadl)
        if g is None:
            raise Refused(hv.HvStatus.INVALID_PARAMETER, f"GPADL_BODY for no GPADL in progress ({msg.gpadl:#x})")
        if len(g.pfns) + len(msg.pfns) > g.total:
            self._drop_gpadl(g)
            raise self._gpadl_failed(g.relid, g.gpadl_id, "GPADL_BODY beyond the declared length")
        try:
            self._check_pfns(msg.pfns)
        except GuestMemoryError as exc:
            self._drop_gpadl(g)
            raise self._gpadl_failed(g.relid, g.gpadl_id, str(exc)) from None
        g.pfns.extend(msg.pfns)
        self._gpadl_progress(g)

    def _gpadl_progress(self, g: Gpadl) -> None:
        if g.complete:
            self.assembling.pop(g.gpadl_id, None)
            self.gpadls[g.gpadl_id] = g
            self._send(P.GpadlCreated(g.relid, g.gpadl_id, P.STATUS_SUCCESS))
        else:
            self.assembling[g.gpadl_id] = g

    def _drop_gpadl(self, g: Gpadl) -> None:
        """Forget a GPADL (held or assembling) and give its pages back."""
        if self.gpadls.get(g.gpadl_id) is g:
            del self.gpadls[g.gpadl_id]
        elif self.assembling.get(g.gpadl_id) is g:
            del self.assembling[g.gpadl_id]
        else:
            return
        self.gpadl_pages -= g.total
        self.budget.give("gpadl_pages", g.total)

    def _on_gpadl_teardown(self, msg: P.GpadlTeardown) -> None:
        g = self.gpadls.get(msg.gpadl)
        if g is None:
            raise Refused(hv.HvStatus.INVALID_PARAMETER, f"teardown of unknown GPADL {msg.gpadl:#x}")
        if any(ch.ring_gpadl == g.gpadl_id and ch.state is ChannelState.OPEN for ch in self.channels.values()):
            raise Refused(hv.HvStatus.INVALID_PARAMETER, f"GPADL {msg.gpadl:#x} is an open channel's ring")
        self._drop_gpadl(g)
        self._send(P.GpadlTorndown(g.gpadl_id))

    def device_gpadl(self, primary: int, handle: int) -> list[int]:
        """The pages of GPADL ``handle`` if the guest made it, complete and
        whole pages, for a channel of the device whose primary is
        ``primary`` (a buffer beyond the rings: ``Channel.gpadl``)."""
        g = self.gpadls.get(handle)
        owner = None if g is None else self.channels.get(g.relid)
        if g is None or owner is None or owner.primary != primary:
            raise GuestMemoryError(f"no GPADL {handle:#x} for this device")
        if g.byte_offset or g.byte_count != g.total << PAGE_SHIFT:
            raise GuestMemoryError(f"GPADL {handle:#x} does not cover whole pages")
        return list(g.pfns)

    # -- open and close ------------------------------------------------------

    def _on_openchannel(self, msg: P.OpenChannel) -> None:
        relid = msg.child_relid
        ch = self.channels.get(relid)

        def fail(why: str) -> Refused:
            self._send(P.OpenChannelResult(relid, msg.openid, P.STATUS_UNSUCCESSFUL))
            return Refused(hv.HvStatus.INVALID_PARAMETER, why)

        if ch is None or ch.state is ChannelState.RESCINDED:
            raise fail(f"open of unknown relid {relid}")
        if ch.state is ChannelState.OPEN:
            raise fail(f"relid {relid} is already open")
        g = self.gpadls.get(msg.ringbuffer_gpadl)
        if g is None or g.relid != relid:
            raise fail(f"ring GPADL {msg.ringbuffer_gpadl:#x} unknown for relid {relid}")
        split = msg.downstream_ring_page_offset
        if g.byte_offset != 0 or g.byte_count != g.total << PAGE_SHIFT or not 2 <= split <= g.total - 2:
            raise fail(f"downstream offset {split} does not split a {g.total}-page ring GPADL")
        try:
            rings = self.partition.memory.contiguous_pages(g.pfns)
        except GuestMemoryError as exc:
            raise fail(f"ring GPADL: {exc}") from None
        cut = split << PAGE_SHIFT
        try:
            # The guest formatted both rings; we attach and distrust them.
            incoming = IncomingRing(rings, 0, cut)
            outgoing = OutgoingRing(rings, cut, len(rings) - cut)
        except (ValueError, RingError) as exc:
            raise fail(f"rings: {exc}") from None
        if self.open_channels >= self.limits.open_channels:
            raise fail(f"{self.open_channels} channels open (the cap)")
        if not self.budget.take("open_channels"):
            raise fail("host-wide cap of open channels reached")
        self.open_channels += 1
        ch.doorbell = Doorbell()
        part = self.partition

        async def wait() -> None:
            assert ch.doorbell is not None
            ch.guest_signals += await ch.doorbell.wait()

        ch.channel = Channel(relid, outgoing, incoming, lambda: part.interrupt(relid), wait)
        ch.channel.sub_index = ch.sub_index
        ch.channel.event_fd = ch.doorbell.fileno()
        if not ch.sub_index:
            ch.channel.request_subchannels = lambda count: self.offer_subchannels(relid, count)
        if ch.primary == relid:
            ch.channel.offer_channel = lambda *a, **kw: self.offer_channel(relid, *a, **kw)
            ch.channel.rescind_channel = lambda extra: self.rescind_owned(relid, extra)
        primary = ch.primary
        ch.channel.gpadl = lambda handle: self.device_gpadl(primary, handle)
        ch.ring_gpadl = g.gpadl_id
        ch.state = ChannelState.OPEN
        ch.scope = trio.CancelScope()
        ch.worker_done = trio.Event()
        self.nursery.start_soon(self._worker, ch, ch.scope, ch.channel)
        log.info("partition %d: channel %d (%s) open", part.id, relid, ch.spec.name)
        self._send(P.OpenChannelResult(relid, msg.openid, P.STATUS_SUCCESS))

    async def _worker(self, ch: HostChannel, scope: trio.CancelScope, channel: Channel) -> None:
        done = ch.worker_done
        try:
            await self._serve_channel(ch, scope, channel)
        finally:
            if done is not None:
                done.set()

    async def _serve_channel(self, ch: HostChannel, scope: trio.CancelScope, channel: Channel) -> None:
        with scope:
            try:
                if ch.serve is not None:
                    await ch.serve(channel)
                else:
                    await ch.device.serve(channel, self.partition.memory)
            except RingError as exc:
                # The guest corrupted its own ring: this channel is finished.
                # Rescind it so the guest's users fail fast instead of waiting.
                self.partition.reject("ring", f"channel {ch.relid}: {exc}; rescinding it")
                self.rescind(ch.relid)
            except trio.ClosedResourceError:
                pass
            except Exception as exc:  # noqa: BLE001 - a device bug stops its channel, nothing else
                self.partition.reject("device", f"channel {ch.relid}: {exc!r}; rescinding it")
                log.debug("partition %d: device %s failed on channel %d", self.partition.id, ch.spec.name,
                          ch.relid, exc_info=True)
                self.rescind(ch.relid)
        if ch.channel is channel and ch.state is ChannelState.OPEN:
            self._stop_channel(ch)  # the device returned on its own: quiesce the channel

    def _stop_channel(self, ch: HostChannel) -> None:
        if ch.scope is not None:
            ch.scope.cancel()
        if ch.channel is not None:
            ch.channel.close()
        if ch.doorbell is not None:
            ch.doorbell.close()
            self.open_channels -= 1
            self.budget.give("open_channels")
        ch.scope = ch.channel = ch.doorbell = None
        ch.ring_gpadl = None

    def _on_closechannel(self, msg: P.CloseChannel) -> None:
        ch = self._channel(msg.child_relid, ChannelState.OPEN)
        self._stop_channel(ch)
        ch.state = ChannelState.OFFERED
        log.info("partition %d: channel %d closed", self.partition.id, ch.relid)

    def _doorbell(self, conn_id: int) -> Doorbell | None:
        """The open channel's doorbell behind a connection id (relid in the low 12 bits)."""
        ch = self.channels.get(conn_id & 0xFFF)
        if ch is None or ch.connection_id != conn_id or ch.state is not ChannelState.OPEN:
            return None
        return ch.doorbell

    def _event_port(self, conn_id: int) -> int | None:
        doorbell = self._doorbell(conn_id)
        return None if doorbell is None else doorbell.fileno()

    def _slow_signal(self, conn_id: int) -> bool:
        doorbell = self._doorbell(conn_id)
        if doorbell is not None:
            # The guest holds this eventfd too (CONNECT_EVENT_PORT): written
            # off the loop, as any write to a guest-shared eventfd.
            self.partition.ring_guest_eventfd(("doorbell", conn_id), doorbell.fileno())
        return doorbell is not None

    # -- rescind and unload ----------------------------------------------------

    def rescind(self, relid: int) -> None:
        """Hot-remove a device: sub-channels first, then the channel itself."""
        ch = self._channel(relid)
        if ch.state is ChannelState.RESCINDED:
            return
        if ch.primary == relid:  # its sub-channels and the channels its device offered
            for sub in [c for c in self.channels.values() if c.primary == relid and c is not ch]:
                self.rescind(sub.relid)
        self._stop_channel(ch)
        ch.state = ChannelState.RESCINDED
        self._send(P.RescindChannelOffer(relid))
        log.info("partition %d: channel %d rescinded", self.partition.id, relid)

    def rescind_all(self) -> None:
        """The host is going away: withdraw every channel the guest was offered."""
        if not self.offers_sent:
            return
        for ch in [c for c in self.channels.values() if c.primary == c.relid]:
            self.rescind(ch.relid)

    def _on_relid_released(self, msg: P.RelidReleased) -> None:
        ch = self._channel(msg.child_relid, ChannelState.RESCINDED)
        for g in [g for g in (*self.gpadls.values(), *self.assembling.values()) if g.relid == ch.relid]:
            self._drop_gpadl(g)
        del self.channels[ch.relid]
        if ch.primary == ch.relid:
            # Sub-channels share the primary's device; they were rescinded with it.
            sharing = [c for c in self.channels.values() if c.device is ch.device]
            workers = [c.worker_done for c in (ch, *sharing) if c.worker_done is not None]
            self.nursery.start_soon(self._close_device, ch.device, workers)

    async def _close_device(self, device: HostDevice, workers: list[trio.Event]) -> None:
        """Close a device once every worker that used it has returned (a
        storage worker's thread may use the disk's fd until then)."""
        for done in workers:
            await done.wait()
        if id(device) not in self._closed_devices:
            self._closed_devices.add(id(device))
            await device.close()

    def _on_unload(self, msg: P.Unload) -> None:
        for ch in self.channels.values():
            if ch.state is ChannelState.OPEN:
                self._stop_channel(ch)
                ch.state = ChannelState.OFFERED
        for g in [*self.gpadls.values(), *self.assembling.values()]:
            self._drop_gpadl(g)
        self.version = None
        self.offers_sent = False
        self._send(P.UnloadResponse())

    async def close(self) -> None:
        """Release everything (the partition is going).  Called once every
        channel worker has returned: the partition's nursery is done."""
        for ch in self.channels.values():
            self._stop_channel(ch)
        for g in [*self.gpadls.values(), *self.assembling.values()]:
            self._drop_gpadl(g)
        for device in self.devices:
            if id(device) not in self._closed_devices:
                self._closed_devices.add(id(device))
                await device.close()

    def snapshot(self) -> dict[str, Any]:
        chans = []
        for ch in self.channels.values():
            entry: dict[str, Any] = {
                "relid": ch.relid, "device": ch.spec.name, "state": ch.state.value, "sub_channel": ch.sub_index,
                "interface": str(ch.interface or ch.spec.interface_id), "guest_signals": ch.guest_signals,
            }
            if ch.channel is not None:
                c = ch.channel
                entry["ring"] = {"incoming": c.incoming.control(), "outgoing": c.outgoing.control()}
                entry["stats"] = vars(c.stats)
            if ch.primary == ch.relid:
                entry["device_state"] = device_snapshot(ch.device)
            chans.append(entry)
        return {"version": None if self.version is None else hex(self.version), "channels": chans,
                "gpadls": len(self.gpadls), "gpadl_pages": self.gpadl_pages, "open_channels": self.open_channels,
                "devices_closed": len(self._closed_devices)}


def device_snapshot(device: HostDevice) -> dict[str, Any]:
    """A device's own part of ``inspect`` (``HostDevice.snapshot``); a device
    whose snapshot fails shows the failure instead of breaking inspect."""
    try:
        return device.snapshot()
    except Exception as exc:  # noqa: BLE001 - a device bug must not take inspect down
        return {"snapshot_failed": repr(exc)}
