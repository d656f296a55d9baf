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
