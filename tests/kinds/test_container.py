"""The container kind is a real container: its own PID 1, host name,
mounts and namespaces, the image's bytes through its bind mount, the
cgroup's limits read back from inside, and everything removed after; with
the mechanism made unavailable, the labelled plain-process fallback."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from pvbus.bench import container, density, kinds
from pvbus.bench.blockload import Workload

MiB = 1 << 20

needs_container = pytest.mark.skipif(container.unavailable() is not None,
                                     reason=f"no container here: {container.unavailable()}")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "d.img"
    path.write_bytes(os.urandom(2 * MiB))
    return path


@needs_container
def test_the_container_is_isolated_limited_and_sees_the_image(image: Path) -> None:
    with container.running(str(image), {"first_io": True}, cpus=0.5, memory=96 * MiB) as box:
        seen = box.identity
        first = next(box.lines())
        cgroup_dirs = list(box.cgroup.layout.dirs.values())
        assert box.pids() and all(d.is_dir() for d in cgroup_dirs)
    host = container.host_view()
    assert seen["pid"] == 1 and seen["processes"] == [1]
    assert seen["hostname"] == container.HOSTNAME != host["hostname"]
    assert seen["kernel"] == host["kernel"] == os.uname().release
    assert all(seen["namespaces"][ns] != host["namespaces"][ns] for ns in container.NAMESPACES)
    assert seen["net_interfaces"] == ["lo"]
    assert any(m.startswith(seen["image"] + " ") for m in seen["mounts"])
    assert first["first_io"] == hashlib.sha256(image.read_bytes()[:4096]).hexdigest()
    assert seen["cgroup_limits"]["cpus"] == 0.5 and seen["cgroup_limits"]["memory_bytes"] == 96 * MiB
    # the host never saw the container's mounts, and nothing is left behind
    assert seen["image"] not in Path("/proc/self/mountinfo").read_text()
    assert not any(d.exists() for d in cgroup_dirs) and not Path(seen["image"]).parent.exists()


@needs_container
def test_the_workload_inside_moves_the_image_bytes(image: Path) -> None:
    wl = Workload("write", 4096, 1, 2 * MiB, runtime=0.05, ramp=0.0)
    before = image.read_bytes()
    seen = container.run_workloads(str(image), [wl])
    rec, = seen["records"]
    assert rec["mode"] == "container" and rec["ios"] > 0 and rec["exits_per_io"] == 0
    assert image.read_bytes() != before  # the writes landed in the host's file
    assert seen["cgroup_usage"]["memory_peak_bytes"] > 0 and seen["cgroup_usage"]["cpu_s"] > 0


def test_without_namespaces_the_fallback_is_taken_and_labelled(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(container.DISABLE_ENV, "1")
    assert container.unavailable() == f"disabled by {container.DISABLE_ENV}"
    wl = Workload("read", 4096, 1, 2 * MiB, runtime=0.05, ramp=0.0)
    records, info = kinds._run_container(str(image), [wl], None)
    assert [r["mode"] for r in records] == [kinds.CONTAINER_FALLBACK]
    assert info[kinds.CONTAINER_FALLBACK]["fallback"] == f"disabled by {container.DISABLE_ENV}"
    assert list(kinds._container_launchers()) == [kinds.CONTAINER_FALLBACK]
    assert kinds.container_mode({"kinds": info}) == kinds.CONTAINER_FALLBACK


@needs_container
def test_a_container_instance_counts_its_processes_memory(image: Path) -> None:
    inst = density.launch_container(str(image))
    try:
        pids = inst.pids()
        assert len(pids) >= 2  # unshare and the container's PID 1
        assert density.pss_bytes(pids) > 1 * MiB
    finally:
        inst.stop()
    assert json.dumps(density.startup(density.launch_container, str(image), 1))  # runs again, cleanly
