"""The modified guest kernel: boot, the VMBus client, drivers, shutdown.

``GuestKernel.boot`` does what Linux's vmbus driver does at start-up
(drivers/hv/connection.c, channel_mgmt.c): allocate RAM, hand it to the
hypervisor, enable the SynIC, negotiate a version newest first (falling
back when the host refuses one, honouring the connection id change at
5.0), ask for offers, and bind each offer whose interface GUID has a
registered driver: allocate its rings (contiguous pages, send ring first),
describe them with a GPADL (header plus as many bodies as needed), open
the channel and fetch its event port.  ``shutdown`` closes every channel
(CLOSECHANNEL, GPADL teardown), then UNLOADs.

Each device has an explicit state: offered -> opening -> open -> closed,
or rescinded at any point.  A rescinded device gives its users
``ChannelRevoked`` (in-flight requests included), never a hang; the
kernel then releases the relid.

A host that goes away (its end of the control socket closes: killed,
crashed, or stopped after rescinding everything) is noticed by a task that
watches the socket from boot until UNLOAD.  Every device is then revoked
with ``HostGone`` (a ``ChannelRevoked``), every wait for the host fails
with it, and the task raises it into the kernel's nursery, which cancels
whatever else runs there: the guest program.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ring import Doorbell, IncomingRing, OutgoingRing
from vmbus import hv
from vmbus import protocol as P
from vmbus.channel import Channel
from vmbus.device import DeviceSpec, GuestDriver, by_interface
from vmbus.errors import BootError, ChannelRevoked, HostGone, HypercallFailed, NoCommonVersion

from .hypercalls import Hypercalls
from .memory import DEFAULT_RAM, PAGE_SHIFT, GuestRam
from .synic import SynIC

log = logging.getLogger(__name__)
FIRST_GPADL = 0xE1E10  # Linux's first GPADL handle (connection.c)
RESPONSE_TIMEOUT = 10.0
POST_RETRIES = 100


class DeviceState(enum.Enum):
    OFFERED = "offered"
    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"
    RESCINDED = "rescinded"


@dataclass
class GuestDevice:
    offer: P.OfferChannel
    spec: DeviceSpec | None
    state: DeviceState = DeviceState.OFFERED
    channel: Channel | None = None
    driver: GuestDriver | None = None
    ring_pfn: int = 0
    ring_pages: int = 0
    gpadl: int = 0
    event_fd: int = -1
    wakeup: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope | None = None
    primary: GuestDevice | None = None  # set on sub-channels
    subchannels: list[GuestDevice] = field(default_factory=list)
    claimed: bool = False  # offered at run time and claimed by the primary's driver

    @property
    def relid(self) -> int:
        return self.offer.child_relid

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else str(self.offer.interface)

    def wake(self) -> None:
        ev, self.wakeup = self.wakeup, trio.Event()
        ev.set()


class GuestKernel:
    def __init__(self, devices: dict[str, DeviceSpec], ram_size: int = DEFAULT_RAM,
                 versions: tuple[int, ...] = P.GUEST_VERSIONS) -> None:
        self.specs = by_interface(devices)
        self.ram = GuestRam(ram_size)
        self.versions = versions
        self.version: int | None = None
        self.msg_conn_id = hv.VMBUS_MESSAGE_CONNECTION_ID
        self.devices: dict[int, GuestDevice] = {}
        self._gpadl_ids = itertools.count(FIRST_GPADL)
        self._waiters: dict[tuple[Any, ...], tuple[trio.Event, list[P.Message]]] = {}
        self._all_offers = trio.Event()
        self.hypercalls: Hypercalls | None = None
        self.synic: SynIC | None = None
        self._nursery: trio.Nursery | None = None
        self.unexpected_messages = 0
        self.legacy_irqs = 0  # interrupts from the emulated disk controllers
        self._legacy_irq = trio.Event()
        self.unloaded = False  # UNLOAD answered: the host owes us nothing more

    # -- messages ----------------------------------------------------------

    def _expect(self, *key: Any) -> tuple[trio.Event, list[P.Message]]:
        slot: tuple[trio.Event, list[P.Message]] = (trio.Event(), [])
        self._waiters[key] = slot
        return slot

    async def _await(self, key: tuple[Any, ...], slot: tuple[trio.Event, list[P.Message]]) -> P.Message:
        with trio.move_on_after(RESPONSE_TIMEOUT) as scope:
            await slot[0].wait()
        self._waiters.pop(key, None)
        self._check_host()
        if scope.cancelled_caught:
            raise BootError(f"no answer from the host to {' '.join(map(str, key))} in {RESPONSE_TIMEOUT:.0f} s")
        return slot[1][0]

    def _on_message(self, data: bytes) -> None:
        try:
            msg = P.decode(data)
        except P.ProtocolError as exc:
            self.unexpected_messages += 1
            log.warning("dropped a bad message from the host: %s", exc)
            return
        key: tuple[Any, ...] | None = None
        if isinstance(msg, P.VersionResponse):
            key = ("version",)
        elif isinstance(msg, P.OfferChannel):
            if msg.child_relid in self.devices:
                self.unexpected_messages += 1
                return
            dev = GuestDevice(msg, self.specs.get(msg.interface))
            self.devices[msg.child_relid] = dev
            if msg.sub_channel_index:
                primary = next((d for d in self.devices.values() if d.offer.if_instance == msg.if_instance
                                and not d.offer.sub_channel_index), None)
                if primary is not None and primary.state is DeviceState.OPEN and self._nursery is not None:
                    dev.primary = primary
                    primary.subchannels.append(dev)
                    self._nursery.start_soon(self._open_subchannel, dev)
            elif dev.spec is None and self._all_offers.is_set():
                self._offer_to_drivers(dev)
            return
        elif isinstance(msg, P.AllOffersDelivered):
            self._all_offers.set()
            return
        elif isinstance(msg, P.GpadlCreated):
            key = ("gpadl", msg.gpadl)
        elif isinstance(msg, P.OpenChannelResult):
            key = ("open", msg.child_relid)
        elif isinstance(msg, P.GpadlTorndown):
            key = ("torndown", msg.gpadl)
        elif isinstance(msg, P.UnloadResponse):
            key = ("unload",)
        elif isinstance(msg, P.RescindChannelOffer):
            rescinded = self.devices.get(msg.child_relid)
            if rescinded is not None and self._nursery is not None:
                self._nursery.start_soon(self._rescinded, rescinded)
            return
        slot = self._waiters.get(key) if key else None
        if slot is None:
            self.unexpected_messages += 1  # a stray response: ignore it
            return
        slot[1].append(msg)
        slot[0].set()

    # -- losing the host -------------------------------------------------------

    @property
    def host_gone(self) -> str | None:
        """Why the host is gone (in words), or None while it is there."""
        return None if self.hypercalls is None else self.hypercalls.lost

    def _check_host(self) -> None:
        if self.host_gone is not None:
            raise HostGone(self.host_gone)

    async def _watch_host(self) -> None:
        assert self.hypercalls is not None
        reason = await self.hypercalls.wait_host_gone()
        if self.unloaded:
            return  # a clean end: nothing waits for the host any more
        log.info("%s", reason)
        await self._lose_host(HostGone(reason))
        raise HostGone(reason)

    async def _lose_host(self, error: HostGone) -> None:
        """Revoke every device with ``error`` and wake every waiter: the
        same path as a rescind, without the messages a live host needs."""
        for dev in list(self.devices.values()):
            was_open = dev.state is DeviceState.OPEN
            if dev.state in (DeviceState.CLOSED, DeviceState.RESCINDED):
                continue
            dev.state = DeviceState.RESCINDED
            if dev.channel is not None:
                dev.channel.revoke(error)
            if was_open:
                await self._stop_driver(dev)
        for event, _ in list(self._waiters.values()):
            event.set()  # each waiter finds no answer and raises HostGone
        self._all_offers.set()
        self._legacy_irq.set()

    def _on_channel_interrupt(self, relid: int) -> None:
        if relid == hv.LEGACY_IRQ_FLAG:
            self.legacy_irqs += 1
            ev, self._legacy_irq = self._legacy_irq, trio.Event()
            ev.set()
            return
        dev = self.devices.get(relid)
        if dev is not None:
            dev.wake()

    async def post(self, msg: P.Message, conn_id: int | None = None) -> int:
        """HvPostMessage with Linux's retry policy for transient refusals."""
        assert self.hypercalls is not None
        data = msg.encode()
        for attempt in range(POST_RETRIES):
            status = await self.hypercalls.post_message(self.msg_conn_id if conn_id is None else conn_id, data)
            if status not in (hv.HvStatus.INSUFFICIENT_BUFFERS, hv.HvStatus.INSUFFICIENT_MEMORY):
                return status
            await trio.sleep(min(1e-6 * 2**attempt, 0.01))  # back-off: the host asked us to
        return status

    async def _post_ok(self, msg: P.Message) -> None:
        status = await self.post(msg)
        if status != hv.HvStatus.SUCCESS:
            raise HypercallFailed(f"post {msg.TYPE.name}", status)

    # -- boot ------------------------------------------------------------------

    async def boot(self, socket_path: str, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        sint = Doorbell()
        try:
            self.hypercalls = await Hypercalls.connect(socket_path, self.ram.fd, self.ram.size, sint.fileno())
        except BaseException:
            sint.close()
            raise
        self.synic = SynIC(self.ram, self.hypercalls, sint)
        self.synic.on_message = self._on_message
        self.synic.on_channel = self._on_channel_interrupt
        nursery.start_soon(self._watch_host)
        await self.synic.enable()
        nursery.start_soon(self.synic.run)
        await self._negotiate()
        await self._post_ok(P.RequestOffers())
        with trio.move_on_after(RESPONSE_TIMEOUT):
            await self._all_offers.wait()
        self._check_host()
        if not self._all_offers.is_set():
            raise BootError("the host never said ALLOFFERS_DELIVERED")
        for dev in list(self.devices.values()):
            if dev.spec is not None:
                await self.open_device(dev)

    async def _negotiate(self) -> None:
        for version in self.versions:
            new_style = version >= P.CONNECTION_ID_CHANGE
            conn = hv.VMBUS_MESSAGE_CONNECTION_ID_4 if new_style else hv.VMBUS_MESSAGE_CONNECTION_ID
            slot = self._expect("version")
            msg = P.InitiateContact(version, 0, hv.VMBUS_MESSAGE_SINT if new_style else 0, 0, 0)
            status = await self.post(msg, conn)
            if status == hv.HvStatus.INVALID_CONNECTION_ID:
                self._waiters.pop(("version",), None)
                continue  # an older host: it does not know connection id 4
            if status != hv.HvStatus.SUCCESS:
                raise HypercallFailed("INITIATE_CONTACT", status)
            resp = await self._await(("version",), slot)
            assert isinstance(resp, P.VersionResponse)
            if resp.version_supported:
                self.version = version
                self.msg_conn_id = resp.msg_conn_id if new_style else hv.VMBUS_MESSAGE_CONNECTION_ID
                log.info("negotiated VMBus version %#x", version)
                return
        raise NoCommonVersion("the host supports none of our VMBus versions")

    # -- channels --------------------------------------------------------------

    async def open_device(self, dev: GuestDevice) -> None:
        assert dev.spec is not None and self.hypercalls is not None and self._nursery is not None
        dev.state = DeviceState.OPENING
        per_ring = 1 + dev.spec.ring_pages  # control page + data pages
        dev.ring_pages = 2 * per_ring
        dev.ring_pfn = self.ram.alloc(dev.ring_pages)
        rings = self.ram.pages_view(dev.ring_pfn, dev.ring_pages)
        send_len = per_ring << PAGE_SHIFT
        # Both ring headers are initialised before OPENCHANNEL (as Linux does).
        outgoing = OutgoingRing(rings, 0, send_len, format=True)
        incoming = IncomingRing(rings, send_len, len(rings) - send_len, format=True)
        dev.gpadl = await self.create_gpadl(dev, list(range(dev.ring_pfn, dev.ring_pfn + dev.ring_pages)))
        slot = self._expect("open", dev.relid)
        await self._post_ok(P.OpenChannel(dev.relid, dev.relid, dev.gpadl, 0, per_ring))
        result = await self._await(("open", dev.relid), slot)
        assert isinstance(result, P.OpenChannelResult)
        if result.status != P.STATUS_SUCCESS:
            raise BootError(f"open of {dev.name} refused ({result.status:#x})")
        dev.event_fd = await self.hypercalls.connect_event_port(dev.offer.connection_id)
        hypercalls = self.hypercalls

        async def wait() -> None:
            await dev.wakeup.wait()

        dev.channel = Channel(dev.relid, outgoing, incoming, lambda: hypercalls.signal_event(dev.event_fd), wait)
        dev.channel.sub_index = dev.offer.sub_channel_index
        dev.channel.create_gpadl = lambda pfns: self.create_gpadl(dev, pfns)
        dev.channel.teardown_gpadl = lambda handle: self.teardown_gpadl(dev, handle)
        dev.state = DeviceState.OPEN
        dev.scope = trio.CancelScope()
        if dev.primary is not None:
            dev.driver = dev.primary.driver
            await self._nursery.start(self._run_subchannel, dev)
        else:
            dev.driver = dev.spec.guest(dev.channel)
            dev.driver.ram = self.ram
            await self._nursery.start(self._run_driver, dev)
        log.info("device %s open on channel %d", dev.name, dev.relid)

    async def create_gpadl(self, dev: GuestDevice, pfns: Sequence[int]) -> int:
        """Describe whole pages of guest RAM to the host for ``dev`` (its
        rings, or a buffer of its own); returns the GPADL handle."""
        handle = next(self._gpadl_ids)
        slot = self._expect("gpadl", handle)
        for msg in P.gpadl_messages(dev.relid, handle, list(pfns), len(pfns) << PAGE_SHIFT):
            await self._post_ok(msg)
        created = await self._await(("gpadl", handle), slot)
        assert isinstance(created, P.GpadlCreated)
        if created.creation_status != P.STATUS_SUCCESS:
            raise BootError(f"GPADL for {dev.name} refused ({created.creation_status:#x})")
        return handle

    async def teardown_gpadl(self, dev: GuestDevice, handle: int) -> None:
        """Withdraw a buffer GPADL of ``dev``: the host stops using its pages."""
        slot = self._expect("torndown", handle)
        status = await self.post(P.GpadlTeardown(dev.relid, handle))
        if status != hv.HvStatus.SUCCESS:
            self._waiters.pop(("torndown", handle), None)
            raise HypercallFailed("GPADL_TEARDOWN", status)
        await self._await(("torndown", handle), slot)

    async def _run_subchannel(self, dev: GuestDevice, task_status: trio.TaskStatus[None]) -> None:
        assert dev.driver is not None and dev.scope is not None and dev.channel is not None
        with dev.scope:
            async with trio.open_nursery() as nursery:
                await dev.driver.add_subchannel(dev.channel, nursery)
                task_status.started()

    def _offer_to_drivers(self, dev: GuestDevice) -> None:
        """An offer no driver binds by GUID, made after boot: a channel an
        open device's host half offered at run time (a socket connection).
        The first open driver that claims it gets it as a channel of its own
        (``GuestDriver.claim_offer``, then ``add_subchannel``); unclaimed, it
        stays offered and unopened, as Linux leaves such offers."""
        for owner in list(self.devices.values()):
            if (owner.state is DeviceState.OPEN and owner.primary is None and owner.driver is not None
                    and self._nursery is not None and owner.driver.claim_offer(dev.offer)):
                dev.spec, dev.primary, dev.claimed = owner.spec, owner, True
                owner.subchannels.append(dev)
                self._nursery.start_soon(self._open_subchannel, dev)
                return

    async def _open_subchannel(self, dev: GuestDevice) -> None:
        try:
            await self.open_device(dev)
        except (BootError, HypercallFailed) as exc:
            log.warning("sub-channel %d of %s did not open: %s", dev.relid, dev.name, exc)

    async def _run_driver(self, dev: GuestDevice, task_status: trio.TaskStatus[None]) -> None:
        assert dev.driver is not None and dev.scope is not None
        with dev.scope:
            async with trio.open_nursery() as nursery:
                await dev.driver.start(nursery)
                task_status.started()
        # normal end: cancelled by close or rescind

    async def wait_legacy_irq(self, seen: int) -> None:
        """Return once more than ``seen`` legacy interrupts have arrived."""
        while self.legacy_irqs <= seen:
            self._check_host()
            await self._legacy_irq.wait()

    async def emulated_disk(self, kind: str) -> Any:
        """The emulated disk controllers an unmodified guest would drive:
        ``"dma"`` (full virtualization) or ``"ide"`` (programmed I/O)."""
        assert self.hypercalls is not None
        if kind == "dma":
            from .drivers.dmadisk import DmaDiskDriver

            disk: Any = DmaDiskDriver(self)
        elif kind == "ide":
            from .drivers.ide import IdeDisk

            disk = IdeDisk(self.hypercalls)
        else:
            raise ValueError(f"unknown emulated disk {kind!r}")
        if not await disk.probe():
            raise LookupError(f"no {kind} controller (start the host with --emulated-disks)")
        return disk

    def device(self, name: str) -> Any:
        """The driver of an open device, for guest programs."""
        self._check_host()
        for dev in self.devices.values():
            if dev.spec is not None and dev.spec.name == name:
                if dev.state is DeviceState.RESCINDED:
                    raise ChannelRevoked(f"device {name} was removed by the host")
                if dev.state is DeviceState.OPEN:
                    return dev.driver
        open_ = sorted(d.name for d in self.devices.values() if d.state is DeviceState.OPEN and d.primary is None)
        raise LookupError(f"the host offers no device {name!r} (open: {', '.join(open_) or 'none'})")

    async def close_device(self, dev: GuestDevice) -> None:
        for sub in dev.subchannels:  # sub-channels close before their primary (as Linux)
            await self.close_device(sub)
        if dev.state is not DeviceState.OPEN:
            return
        dev.state = DeviceState.CLOSED
        await self._stop_driver(dev)
        slot = self._expect("torndown", dev.gpadl)
        for msg in (P.CloseChannel(dev.relid), P.GpadlTeardown(dev.relid, dev.gpadl)):
            status = await self.post(msg)
            if status != hv.HvStatus.SUCCESS:
                # The host rescinded the channel while we closed it (a host
                # stopping does that; its RESCINDCHANNEL is on the way): it
                # holds nothing of the channel any more, nor will it answer.
                log.info("closing %s (channel %d): %s refused (%#x): taken as rescinded",
                         dev.name, dev.relid, msg.TYPE.name, status)
                self._waiters.pop(("torndown", dev.gpadl), None)
                break
        else:
            await self._await(("torndown", dev.gpadl), slot)
        self._release_rings(dev)

    async def _stop_driver(self, dev: GuestDevice) -> None:
        if dev.channel is not None:
            dev.channel.close()
        dev.wake()
        if dev.driver is not None and dev.primary is None:
            with trio.CancelScope(shield=True):
                await dev.driver.stop()
        if dev.scope is not None:
            dev.scope.cancel()
        if dev.event_fd >= 0:
            os.close(dev.event_fd)
            dev.event_fd = -1

    def _release_rings(self, dev: GuestDevice) -> None:
        if dev.ring_pages:
            dev.channel = None
            self.ram.free(dev.ring_pfn, dev.ring_pages)
            dev.ring_pages = 0

    async def _rescinded(self, dev: GuestDevice) -> None:
        was_open = dev.state is DeviceState.OPEN
        dev.state = DeviceState.RESCINDED
        log.info("device %s (channel %d) rescinded by the host", dev.name, dev.relid)
        if dev.channel is not None:
            dev.channel.revoke()
        if was_open:
            await self._stop_driver(dev)
            self._release_rings(dev)  # the host dropped the channel: no teardown wait
        if dev.claimed and dev.primary is not None:
            # A claimed channel leaves no trace: once released, the host may
            # offer its relid again (even before the post below returns).
            self.devices.pop(dev.relid, None)
            if dev in dev.primary.subchannels:
                dev.primary.subchannels.remove(dev)
        try:
            status = await self.post(P.RelidReleased(dev.relid))
        except HostGone:
            return  # a host stopping rescinds everything, then goes: the watcher reports it
        if status != hv.HvStatus.SUCCESS:  # (we unloaded meanwhile: the host forgot the relid with the rest)
            log.info("RELID_RELEASED for channel %d refused (%#x)", dev.relid, status)

    async def shutdown(self) -> None:
        for dev in list(self.devices.values()):
            if dev.primary is None and dev.state is DeviceState.OPEN and dev.driver is not None:
                await dev.driver.quiesce()  # before any channel closes (a socket's linger)
        for dev in list(self.devices.values()):
            if dev.primary is None:
                await self.close_device(dev)
        if self.version is not None:
            slot = self._expect("unload")
            await self._post_ok(P.Unload())
            await self._await(("unload",), slot)
            self.unloaded = True
            self.version = None

    def close(self) -> None:
        if self.synic is not None:
            self.synic.close()
        if self.hypercalls is not None:
            self.hypercalls.close()
        for dev in self.devices.values():
            if dev.event_fd >= 0:
                os.close(dev.event_fd)
                dev.event_fd = -1
        self.ram.close()

    def statistics(self) -> dict[str, Any]:
        assert self.hypercalls is not None and self.synic is not None
        return {
            "version": None if self.version is None else hex(self.version),
            "exits": dict(self.hypercalls.exits),
            "interrupts": self.synic.interrupts,
            "messages": self.synic.messages,
            "unexpected_messages": self.unexpected_messages,
            "devices": {d.name: d.state.value for d in self.devices.values()},
        }


