"""The trapped-device registry: windows, attachment and cleanup."""

from __future__ import annotations

from typing import Any

import pytest

from vmbus.trapped import TrappedDeviceSpec, attach, check_windows, load_trapped_devices


class Model:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    async def access(self, offset: int, size: int, write: bool, value: int) -> int:
        return offset

    def close(self) -> None:
        self.log.append(f"closed {self.name}")


class FakePartition:
    io_regions: list[Any] = []


def spec(name: str, base: int, length: int, log: list[str], fail: bool = False) -> TrappedDeviceSpec:
    def make(config: dict[str, Any], partition: Any) -> Model:
        if fail:
            raise OSError(f"{name}: no such image")
        return Model(log, name)

    return TrappedDeviceSpec(name, base, length, make)


def test_the_shipped_controllers_are_registered_without_overlap() -> None:
    installed = load_trapped_devices()
    assert {"ide", "dma"} <= set(installed)
    check_windows(installed.values())
    assert installed["ide"].holds(0x1F7) and not installed["ide"].holds(0x1F8)


def test_overlapping_or_empty_windows_are_refused() -> None:
    log: list[str] = []
    with pytest.raises(ValueError, match="overlap"):
        check_windows([spec("a", 0x100, 0x10, log), spec("b", 0x10F, 4, log)])
    with pytest.raises(ValueError, match="empty"):
        check_windows([spec("a", 0x100, 0, log)])
    check_windows([spec("a", 0x100, 0x10, log), spec("b", 0x110, 4, log)])  # adjacent is fine


def test_attach_routes_windows_and_a_failing_factory_closes_what_was_built() -> None:
    log: list[str] = []
    part = FakePartition()
    models = attach(part, [(spec("a", 0x100, 0x10, log), {}), (spec("b", 0x200, 8, log), {})])
    assert [(base, length) for base, length, _ in part.io_regions] == [(0x100, 0x10), (0x200, 8)]
    assert [m.name for m in models] == ["a", "b"]  # type: ignore[attr-defined]
    other = FakePartition()
    with pytest.raises(OSError, match="no such image"):
        attach(other, [(spec("c", 0x100, 0x10, log), {}), (spec("d", 0x200, 8, log, fail=True), {})])
    assert log == ["closed c"]
    assert other.io_regions == []
