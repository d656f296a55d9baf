"""The devices that ship with the project, as ``DeviceSpec`` entry points.

Each spec pairs a host driver and a guest driver through one interface
GUID; ``pyproject.toml`` publishes them under ``pvbus.devices`` exactly as a
third-party package would.  Imports of the two halves are deferred so the
host never loads guest code and the guest never loads host code.
"""

from __future__ import annotations

from typing import Any

from vmbus.device import DeviceSpec
from vmbus.protocols import echo as echo_protocol
from vmbus.protocols import storvsc as storvsc_protocol


def _echo_host(config: dict[str, Any]) -> Any:
    from host_drivers.echo import EchoHost

    return EchoHost(config)


def _echo_guest(channel: Any) -> Any:
    from guest_kernel.drivers.echo import EchoDriver

    return EchoDriver(channel)


ECHO = DeviceSpec(
    name="echo",
    interface_id=echo_protocol.INTERFACE_ID,
    host=_echo_host,
    guest=_echo_guest,
    ring_pages=4,
    description="echoes each request's bytes back in its completion",
)


def _storage_host(config: dict[str, Any]) -> Any:
    from host_drivers.storage.device import StorvspHost

    return StorvspHost(config)


def _storage_guest(channel: Any) -> Any:
    from guest_kernel.drivers.storvsc import StorvscDriver

    return StorvscDriver(channel)


STORAGE = DeviceSpec(
    name="storage",
    interface_id=storvsc_protocol.INTERFACE_ID,
    host=_storage_host,
    guest=_storage_guest,
    ring_pages=64,
    description="SCSI disk backed by a disk image or block device (storvsc/storvsp)",
    needs_config=True,
)
