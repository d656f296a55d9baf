"""A device's two halves joined in one process, for testing its protocol.

``open_device_pair(spec)`` does what the guest kernel and the host server
do for one offer, without either of them: it lays a ring pair out in a
sealed memfd standing in for guest RAM (send ring first, both formatted by
the "guest", as Linux does), gives the host its bounds-checked
``GuestMemory`` over the same fd, joins the two ``Channel`` objects with
real eventfd doorbells (guest -> host is the channel's ``event_fd``, so a
device that serves its rings from a worker thread works too), runs the
host device's ``serve`` as a task and starts the guest driver::

    async with open_device_pair(SPEC) as pair:
        assert await pair.guest.read(16) ...
        pair.host_channel.stats.packets_received

No control socket, no SynIC and no second process: the protocol logic of a
device (its parsing, its answers, what a hostile peer can make it do) is
tested in milliseconds.  ``pair.guest_rings`` gives the guest side's raw
rings, so a test can also play a hostile guest against the host device.
The bus itself (offers, GPADLs, versions, sub-channel offers: the host
channel's ``request_subchannels`` is None here, so a device configured
for sub-channels refuses them) is what the two-process tests cover; this
kit leaves it out on purpose.

A driver that hands the host buffers by page list needs guest RAM with a
page allocator: pass ``ram=`` an object with ``fd``, ``size``,
``alloc(npages)``, ``free(pfn, npages)`` and ``pages_view(pfn, npages)``
(the guest kernel's ``GuestRam`` is one); the rings are then allocated in
it and the driver's ``ram`` attribute is set to it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ring import PAGE_SIZE, Doorbell, IncomingRing, OutgoingRing, SharedMemory

from .channel import Channel
from .device import DeviceSpec
from .guest_memory import GuestMemory, GuestMemoryError

RELID = 1


class PageAllocatingRam(Protocol):
    """What ``open_device_pair`` needs of guest RAM that drivers allocate in."""

    @property
    def fd(self) -> int: ...

    size: int

    def alloc(self, npages: int) -> int: ...

    def free(self, pfn: int, npages: int) -> None: ...

    def pages_view(self, pfn: int, npages: int) -> memoryview: ...


@dataclass
class DevicePair:
    """Both halves of one open channel, in this process."""

    # Typed loosely on purpose: a test calls its own device's methods on
    # them (``pair.guest.read(...)``), which the base classes do not declare.
    host: Any  # the spec's HostDevice
    guest: Any  # the spec's GuestDriver
    host_channel: Channel
    guest_channel: Channel
    memory: GuestMemory  # the host's view of guest RAM
    guest_rings: tuple[OutgoingRing, IncomingRing]  # guest -> host, host -> guest
    host_doorbell: Doorbell  # rung by the guest (the channel's event_fd on the host)
    guest_doorbell: Doorbell  # rung by the host (the guest's channel interrupt)


@asynccontextmanager
async def open_device_pair(
    spec: DeviceSpec,
    *,
    config: dict[str, Any] | None = None,
    ram: PageAllocatingRam | None = None,
    ring_pages: int | None = None,
) -> AsyncIterator[DevicePair]:
    """Open ``spec``'s host device and guest driver over one channel.

    On exit the guest driver is stopped, the host's ``serve`` cancelled,
    ``close`` called on the host device and every fd and mapping released.
    An exception from either half's tasks propagates out of the block."""
    per_ring = 1 + (ring_pages if ring_pages is not None else spec.ring_pages)  # control page + data
    ring_bytes = 2 * per_ring * PAGE_SIZE
    own_ram: SharedMemory | None = None
    if ram is None:
        own_ram = SharedMemory.create(ring_bytes + PAGE_SIZE, "pvbus-testing-ram")
        ram_fd, ram_size, first_pfn = own_ram.fd, own_ram.size, 1  # page 0 stays unused, as in a guest
        rings_view = memoryview(own_ram.buf)[PAGE_SIZE : PAGE_SIZE + ring_bytes]
    else:
        ram_fd, ram_size = ram.fd, ram.size
        first_pfn = ram.alloc(2 * per_ring)
        rings_view = ram.pages_view(first_pfn, 2 * per_ring)
    memory = GuestMemory(os.dup(ram_fd), ram_size)
    host_bell, guest_bell = Doorbell(), Doorbell()
    try:
        send_len = per_ring * PAGE_SIZE
        # The guest formats both rings; the host attaches to them and, as
        # with a real guest, trusts nothing in them.
        guest_out = OutgoingRing(rings_view, 0, send_len, format=True)
        guest_in = IncomingRing(rings_view, send_len, ring_bytes - send_len, format=True)
        host_view = memory.contiguous_pages(list(range(first_pfn, first_pfn + 2 * per_ring)))
        host_in = IncomingRing(host_view, 0, send_len)
        host_out = OutgoingRing(host_view, send_len, ring_bytes - send_len)

        async def host_wait() -> None:
            await host_bell.wait()

        # Several guest tasks may wait at once (the driver's completion
        # reader and a sender waiting for room), as in the guest kernel,
        # where the SynIC interrupt wakes every waiter of the channel: one
        # task reads the doorbell and wakes them all.
        guest_wakeup = trio.Event()

        async def guest_wait() -> None:
            await guest_wakeup.wait()

        async def deliver_guest_interrupts() -> None:
            nonlocal guest_wakeup
            while True:
                await guest_bell.wait()
                woken, guest_wakeup = guest_wakeup, trio.Event()
                woken.set()

        host_channel = Channel(RELID, host_out, host_in, guest_bell.ring, host_wait)
        host_channel.event_fd = host_bell.fileno()
        guest_channel = Channel(RELID, guest_out, guest_in, host_bell.ring, guest_wait)
        # Buffer GPADLs beyond the rings (``Channel.gpadl``): a table here,
        # where the bus would check and keep them.
        gpadls: dict[int, list[int]] = {}

        async def create_gpadl(pfns: Any) -> int:
            handle = 0xE1E10 + len(gpadls) + 1
            gpadls[handle] = list(pfns)
            return handle

        async def teardown_gpadl(handle: int) -> None:
            gpadls.pop(handle, None)

        def host_gpadl(handle: int) -> list[int]:
            if handle not in gpadls:
                raise GuestMemoryError(f"no GPADL {handle:#x} for this device")
            return gpadls[handle]

        host_channel.gpadl = host_gpadl
        guest_channel.create_gpadl = create_gpadl
        guest_channel.teardown_gpadl = teardown_gpadl
        host = spec.host(config or {})
        guest = spec.guest(guest_channel)
        guest.ram = ram
        async def serve() -> None:
            try:
                await host.serve(host_channel, memory)
            except trio.ClosedResourceError:
                pass  # the channel closed under it, as the host server allows too

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver_guest_interrupts)
                nursery.start_soon(serve)
                await guest.start(nursery)
                try:
                    yield DevicePair(host, guest, host_channel, guest_channel, memory, (guest_out, guest_in),
                                     host_bell, guest_bell)
                finally:
                    with trio.CancelScope(shield=True):
                        await guest.stop()
                    nursery.cancel_scope.cancel()  # then both halves' tasks end before the channels close
        finally:
            guest_channel.close()
            host_channel.close()
            with trio.CancelScope(shield=True):
                await host.close()
    finally:
        host_bell.close()
        guest_bell.close()
        if ram is not None:
            rings_view.release()
            ram.free(first_pfn, 2 * per_ring)
        memory.close()
        if own_ram is not None:
            rings_view.release()
            own_ram.close()
