"""The driver API: how a paravirtual device is written and registered.

A device is a pair sharing one protocol module and one interface GUID:

- a ``HostDevice`` (the VSP) that the host offers to every guest and
  whose ``serve`` runs as the channel's worker task once the guest opens
  it; it gets the ``Channel`` and the bounds-checked ``GuestMemory``;
- a ``GuestDriver`` (the VSC) that the guest kernel binds to an offer with
  the same interface GUID; ``start`` runs once the channel is open, and
  guest programs reach the driver through ``kernel.device(name)``.

Both are described by one ``DeviceSpec`` and published under the entry
point group ``pvbus.devices``, so a separately installed package adds a
device without touching the bus::

    [project.entry-points."pvbus.devices"]
    echo = "mypkg.echo:SPEC"

``docs/writing-a-driver.md`` walks through the bundled example.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .channel import Channel
    from .guest_memory import GuestMemory

ENTRY_POINT_GROUP = "pvbus.devices"
S = TypeVar("S")
log = logging.getLogger(__name__)


class DeviceCommandError(Exception):
    """A device refused an admin command (bad arguments, a guest that did
    not answer...); its text is the one line the user sees."""


@dataclass(frozen=True)
class HostPlace:
    """Where a host device runs, for one that makes host resources of its
    own per guest (the sockets device's Unix socket beside the host's)."""

    partition: int  # the guest's partition id
    host_socket: str | None  # the host's guest socket; a device's own sockets go beside it
    access: Any = None  # ``vmbus.access.Access``: who may connect to sockets the host makes


class HostDevice:
    """Host half of a device.  One instance per guest partition.

    ``snapshot`` adds the device's own state to ``pvbus inspect``; ``admin``
    runs a command the admin socket names by device (``pvbus shutdown``,
    ``pvbus kvp``): the bus passes both through without knowing any device.
    """

    place: HostPlace | None = None  # set by the bus (None in the in-process test kit)

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    async def serve(self, channel: Channel, memory: GuestMemory) -> None:
        """Serve the open channel until cancelled (close, rescind, guest gone)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release host resources when the partition goes away."""

    def snapshot(self) -> dict[str, Any]:
        """The device's state for ``pvbus inspect`` (JSON-able); none by default."""
        return {}

    async def admin(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run an admin command; ``DeviceCommandError`` for one it does not know."""
        raise DeviceCommandError(f"this device has no command {command!r}")


class GuestDriver:
    """Guest half of a device.  One instance per bound offer.

    ``ram`` is set by the kernel before ``start``: the guest's RAM and page
    allocator, for drivers that hand the host buffers by page list.
    """

    ram: Any = None

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def start(self, nursery: Any) -> None:
        """The channel is open; start background tasks in ``nursery``."""

    async def add_subchannel(self, channel: Channel, nursery: Any) -> None:
        """A sub-channel the host offered (after the driver asked for it) is
        open, or a channel this driver claimed (``claim_offer``)."""

    def claim_offer(self, offer: Any) -> bool:
        """An offer made after boot that no driver binds by GUID (a
        ``vmbus.protocol.OfferChannel``): True to have the kernel open it and
        hand it to ``add_subchannel``.  None is claimed by default."""
        return False

    async def quiesce(self) -> None:
        """The guest shuts down and is about to close every channel: finish
        what is still owed to the host first (a socket's last bytes), within
        a bound of the driver's own.  Nothing by default."""

    async def stop(self) -> None:
        """The device is going away (shutdown or rescind)."""


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    interface_id: uuid.UUID
    host: Callable[[dict[str, Any]], HostDevice]
    guest: Callable[[Channel], GuestDriver]
    ring_pages: int = 16  # per direction, 4 KiB each
    description: str = ""
    needs_config: bool = False  # offered only when the host is given its configuration
    # The options its host half takes, as a dataclass (``vmbus.config``):
    # checked and converted before the device sees them.
    config_schema: type | None = None


def load_specs(group: str, kind: type[S]) -> dict[str, S]:
    """Every spec of type ``kind`` (each with a ``name``) published under the
    entry point ``group``; a plug-in that fails to load or is of another
    type is logged and left out."""
    found: dict[str, S] = {}
    for ep in entry_points(group=group):
        try:
            spec = ep.load()
        except Exception:  # noqa: BLE001 - one broken plug-in must not stop the bus
            log.exception("cannot load entry point %s of %s", ep.name, group)
            continue
        if not isinstance(spec, kind):
            log.error("entry point %s of %s is not a %s", ep.name, group, kind.__name__)
            continue
        found[spec.name] = spec  # type: ignore[attr-defined]
    return found


def load_devices() -> dict[str, DeviceSpec]:
    """Every device installed under the ``pvbus.devices`` entry point group."""
    return load_specs(ENTRY_POINT_GROUP, DeviceSpec)


def by_interface(devices: dict[str, DeviceSpec]) -> dict[uuid.UUID, DeviceSpec]:
    return {spec.interface_id: spec for spec in devices.values()}
