"""Where FUSE or loop devices are missing, one line says which and why
(in process, the devices' absence simulated; nothing is mounted)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from guest_kernel import namespaces
from guest_kernel.presenters import fuse_disk


def _without(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == path else real(p))


def test_no_dev_fuse_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    if fuse_disk.pyfuse3 is None:
        assert "pyfuse3 is not installed" in (fuse_disk.fuse_available() or "")
        return
    _without(monkeypatch, "/dev/fuse")

    async def present() -> None:
        async with fuse_disk.presented({}, "/nonexistent/pvbus-never-made"):
            raise AssertionError("presented without FUSE")

    with pytest.raises(fuse_disk.PresenterError) as caught:
        trio.run(present)
    message = str(caught.value.strerror)
    assert message == ("cannot show the disks to programs: there is no /dev/fuse "
                       "(load the fuse module, or give the guest the FUSE device)")
    assert not os.path.lexists("/nonexistent/pvbus-never-made")


def test_no_loop_devices_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "/dev/loop-control")
    calls: list[Any] = []
    monkeypatch.setattr(trio, "run_process", lambda *a, **k: calls.append(a))
    with pytest.raises(namespaces.NamespaceError) as caught:
        trio.run(namespaces.attach_loop, "/dev/pvbus/disk0")
    assert str(caught.value.strerror) == ("cannot attach /dev/pvbus/disk0 to a loop device: there is no "
                                          "/dev/loop-control (load the loop module, or give the guest the "
                                          "loop devices)")
    assert calls == []  # losetup never ran
