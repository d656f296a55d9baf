"""The devices that ship with the project, as ``DeviceSpec`` entry points.

Each spec pairs a host driver and a guest driver through one interface
GUID; ``pyproject.toml`` publishes them under ``pvbus.devices`` exactly as a
third-party package would.  Imports of the two halves are deferred so the
host never loads guest code and the guest never loads host code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vmbus.device import DeviceSpec
from vmbus.protocols import echo as echo_protocol
from vmbus.protocols import storvsc as storvsc_protocol


def _lazy(path: str) -> Callable[[Any], Any]:
    """``module:Class`` constructed on first use, imported only then."""
    module, name = path.split(":")

    def make(arg: Any) -> Any:
        return getattr(importlib.import_module(module), name)(arg)

    return make


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
)
