"""Trapped devices: register windows whose every access is an exit.

An emulated (trapped) device is what a fully virtualized or emulated guest
drives: it programs registers, and each access traps to the host, where a
device *model* answers it (``Partition`` routes an ``IO`` exit by address
to the model whose window holds it).  The bus knows no particular model:
each is described by a ``TrappedDeviceSpec`` (its window and a factory)
and published under the entry point group ``pvbus.trapped_devices``, just
as paravirtual devices are under ``pvbus.devices``; the host attaches the
ones it is configured with to every partition and closes them when the
partition goes.

A model is any object with

- ``async access(offset, size, write, value) -> int``: one register access
  at ``offset`` into its window (the value read; writes return anything).
  A guest may send any size and offset: a model refuses what it does not
  take by raising ``vmbus.errors.RegisterAccessRefused`` (the exit fails
  with INVALID_PARAMETER) or answers it as a floating bus;
- ``close()``: release what it holds (an image, threads).

Its factory gets the model's configuration and the partition (for guest
memory, ``partition.memory``, and interrupts, ``partition.interrupt``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .device import load_specs

ENTRY_POINT_GROUP = "pvbus.trapped_devices"


class TrappedModel(Protocol):
    async def access(self, offset: int, size: int, write: bool, value: int) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TrappedDeviceSpec:
    name: str
    base: int  # first address of the register window
    length: int  # addresses in the window
    host: Callable[[dict[str, Any], Any], TrappedModel]  # (config, partition) -> model
    description: str = ""

    def holds(self, address: int) -> bool:
        return self.base <= address < self.base + self.length


def load_trapped_devices() -> dict[str, TrappedDeviceSpec]:
    """Every trapped device installed under ``pvbus.trapped_devices``."""
    return load_specs(ENTRY_POINT_GROUP, TrappedDeviceSpec)


def check_windows(specs: Iterable[TrappedDeviceSpec]) -> None:
    """Refuse a set of devices whose register windows overlap or are empty."""
    ordered = sorted(specs, key=lambda s: s.base)
    for spec in ordered:
        if spec.length <= 0 or spec.base < 0:
            raise ValueError(f"trapped device {spec.name}: empty or negative window")
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.base < a.base + a.length:
            raise ValueError(f"trapped devices {a.name} and {b.name} overlap at {b.base:#x}")


def attach(partition: Any, configured: Iterable[tuple[TrappedDeviceSpec, dict[str, Any]]]) -> list[TrappedModel]:
    """Build each configured model for ``partition`` and route its window to
    it; returns the models (the caller closes them when the partition goes).
    If one factory fails, those already built are closed and it re-raises."""
    models: list[TrappedModel] = []
    regions: list[tuple[int, int, TrappedModel]] = []
    try:
        for spec, config in configured:
            model = spec.host(config, partition)
            models.append(model)
            regions.append((spec.base, spec.length, model))
    except BaseException:
        for model in models:
            model.close()
        raise
    partition.io_regions = regions
    return models
