"""The devices that ship with the project, as ``DeviceSpec`` entry points
(paravirtual devices) and ``TrappedDeviceSpec`` ones (emulated controllers).

Each spec pairs a host driver and a guest driver through one interface
GUID; ``pyproject.toml`` publishes them under ``pvbus.devices`` exactly as a
third-party package would.  Imports of the two halves are deferred so the
host never loads guest code and the guest never loads host code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmbus.config import REQUIRED, Size, option
from vmbus.device import DeviceSpec
from vmbus.protocols import echo as echo_protocol
from vmbus.protocols import emulated_disks as emulated
from vmbus.protocols import hvsock as hvsock_protocol
from vmbus.protocols import ic as ic_protocol
from vmbus.protocols import netvsc as netvsc_protocol
from vmbus.protocols import storvsc as storvsc_protocol
from vmbus.trapped import TrappedDeviceSpec


def _lazy(path: str) -> Callable[[Any], Any]:
    """``module:Class`` constructed on first use, imported only then."""
    module, name = path.split(":")

    def make(arg: Any) -> Any:
        return getattr(importlib.import_module(module), name)(arg)

    return make


# -- configuration each device declares (``--device NAME:key=value,...``) ---


@dataclass(frozen=True)
class StorageConfig:
    path: str = option("disk image or block device (what --disk sets)", REQUIRED)
    read_only: bool = option("offer the disk read-only", False)
    size: Size | None = option("create a missing image at this size (an existing one is never resized)")
    max_transfer: Size | None = option("largest request it advertises (default 1M)")
    subchannels: int | None = option("I/O queues besides the primary channel (default 3)")
    fast_path: bool | None = option("serve regular reads and writes in C (default yes)")
    poll_us: int | None = option("microseconds a queue polls before sleeping (default 200)")


@dataclass(frozen=True)
class HeartbeatConfig:
    interval: float | None = option("seconds between beats (default 1)")
    timeout: float | None = option("seconds to wait for the guest's answer")


@dataclass(frozen=True)
class ShutdownConfig:
    timeout: float | None = option("seconds to wait for the guest's answer")


@dataclass(frozen=True)
class TimesyncConfig:
    interval: float | None = option("seconds between time samples (default 5)")
    timeout: float | None = option("seconds to wait for the guest's answer")


@dataclass(frozen=True)
class KvpConfig:
    refresh: float | None = option("seconds between reads of the guest's pool (default 10)")
    timeout: float | None = option("seconds to wait for the guest's answer")
    values: dict[str, str] | None = option("values the host sets at start (from code; not on the command line)")


@dataclass(frozen=True)
class NetConfig:
    backend: str = option("where the guest's frames go: tap (a host TAP interface) or switch "
                          "(a learning switch joining the guests of this host)", REQUIRED)
    ifname: str | None = option("tap: the host interface's name (default pvtap<pid>)")
    netns: str | None = option("tap: a named network namespace to put the host interface in")
    address: str | None = option("tap: an address for the host interface, ADDR/PREFIX")
    switch: str | None = option("switch: the switch's name (default 'default')")
    mac: str | None = option("the NIC's MAC address (default 00:15:5d and three random bytes)")
    mtu: int | None = option("the link's MTU, 1500 to 9202 (default 1500)")


ECHO = DeviceSpec(
    name="echo",
    interface_id=echo_protocol.INTERFACE_ID,
    host=_lazy("host_drivers.echo:EchoHost"),
    guest=_lazy("guest_kernel.drivers.echo:EchoDriver"),
    ring_pages=4,
    description="echoes each request's bytes back in its completion",
)

STORAGE = DeviceSpec(
    name="storage",
    interface_id=storvsc_protocol.INTERFACE_ID,
    host=_lazy("host_drivers.storage.device:StorvspHost"),
    guest=_lazy("guest_kernel.drivers.storvsc:StorvscDriver"),
    ring_pages=64,
    description="SCSI disk backed by a disk image or block device (storvsc/storvsp)",
    needs_config=True,
    config_schema=StorageConfig,
)

NET = DeviceSpec(
    name="net",
    interface_id=netvsc_protocol.INTERFACE_ID,
    host=_lazy("host_drivers.net.device:NetvspHost"),
    guest=_lazy("guest_kernel.drivers.netvsc:NetvscDriver"),
    ring_pages=128,  # Linux's netvsc ring_size default
    description="synthetic NIC (netvsc/netvsp): a TAP interface in the guest, a host TAP or switch behind it",
    needs_config=True,
    config_schema=NetConfig,
)

# The integration services: one device each, on the ICMSG framework
# (``vmbus.protocols.ic``).  Three data pages per direction, as Linux's hv_util.
HEARTBEAT = DeviceSpec(
    name="heartbeat",
    interface_id=ic_protocol.HEARTBEAT_ID,
    host=_lazy("host_drivers.ic.heartbeat:HeartbeatHost"),
    guest=_lazy("guest_kernel.drivers.ic:HeartbeatDriver"),
    ring_pages=3,
    description="integration service: the host sees the guest alive (sequence, last seen, lost after 3 beats)",
    config_schema=HeartbeatConfig,
)

SHUTDOWN = DeviceSpec(
    name="shutdown",
    interface_id=ic_protocol.SHUTDOWN_ID,
    host=_lazy("host_drivers.ic.shutdown:ShutdownHost"),
    guest=_lazy("guest_kernel.drivers.ic:ShutdownDriver"),
    ring_pages=3,
    description="integration service: the host asks the guest to power off or reboot (pvbus shutdown)",
    config_schema=ShutdownConfig,
)

TIMESYNC = DeviceSpec(
    name="timesync",
    interface_id=ic_protocol.TIMESYNC_ID,
    host=_lazy("host_drivers.ic.timesync:TimesyncHost"),
    guest=_lazy("guest_kernel.drivers.ic:TimesyncDriver"),
    ring_pages=3,
    description="integration service: host clock samples; the guest's offset and corrected clock",
    config_schema=TimesyncConfig,
)

KVP = DeviceSpec(
    name="kvp",
    interface_id=ic_protocol.KVP_ID,
    host=_lazy("host_drivers.ic.kvp:KvpHost"),
    guest=_lazy("guest_kernel.drivers.ic_kvp:KvpDriver"),
    ring_pages=3,
    description="integration service: key/value pools shared by host and guest (pvbus kvp)",
    config_schema=KvpConfig,
)


# -- trapped (emulated) devices: register windows, every access an exit ----


def _emulated_disk(model: str) -> Any:
    """``(config, partition) -> model`` for an emulated disk controller on
    the image the configuration names (the storage device's)."""

    def make(config: dict[str, Any], partition: Any) -> Any:
        from host_drivers.emulated.dma import DmaDisk
        from host_drivers.emulated.ide import IdePio
        from host_drivers.storage.backend import DiskImage

        disk = DiskImage(config["path"], read_only=bool(config.get("read_only")))
        return IdePio(disk) if model == "ide" else DmaDisk(disk, partition)

    return make


IDE_CONTROLLER = TrappedDeviceSpec(
    name="ide",
    base=emulated.IDE_BASE,
    length=emulated.IDE_PORTS,
    host=_emulated_disk("ide"),
    description="IDE-like disk controller, programmed I/O only: every 16-bit data word is an exit",
)

DMA_CONTROLLER = TrappedDeviceSpec(
    name="dma",
    base=emulated.DMA_BASE,
    length=emulated.DMA_REGS,
    host=_emulated_disk("dma"),
    description="DMA disk controller: a request is a few register writes, a doorbell and an interrupt",
)


# -- Hyper-V sockets -------------------------------------------------------------


@dataclass(frozen=True)
class SocketsConfig:
    services: str | None = option(
        "guest ports forwarded to host services: PORT=tcp:HOST:PORT or PORT=unix:PATH, several joined by ';'")
    listen: bool | None = option("a Unix socket per guest (<host socket>.vsock.<partition>) where host programs "
                                 "write CONNECT <port> to reach a guest's listening port (default yes)")
    max_connections: int | None = option("connections one guest may have at once (default 256)")
    accept_timeout: float | None = option("seconds a guest has to accept a host program's connection (default 2)")

    def __post_init__(self) -> None:
        from host_drivers.sockets.services import parse_services
        from vmbus.config import ConfigError

        try:
            parse_services(self.services or "")
        except ValueError as exc:
            raise ConfigError(f"device sockets: option services: {exc}") from None
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError("device sockets: option max_connections takes a whole number of at least 1")


SOCKETS = DeviceSpec(
    name="sockets",
    interface_id=hvsock_protocol.INTERFACE_ID,
    host=_lazy("host_drivers.sockets.device:SocketsHost"),
    guest=_lazy("guest_kernel.drivers.hvsock:SocketsDriver"),
    ring_pages=32,
    description="Hyper-V sockets: guest streams to host services, host programs to guest ports (hv_sock)",
    config_schema=SocketsConfig,
)
