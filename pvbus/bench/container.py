"""The container kind: the native workload inside a real container.

A container here is what Docker or runc would make of it, built from the
system's own tools: util-linux ``unshare`` puts a Python program as PID 1
into new mount, PID, UTS, IPC and network namespaces (``--mount-proc``
gives it its own ``/proc``, ``--kill-child`` ends it with ``unshare``),
after a ``sh`` wrapper has written its own PID into a cgroup of ours with a
CPU and a memory limit (cgroup v2 where the machine has the cpu and memory
controllers there, else v1).  Inside, the program sets its host name,
mounts a tmpfs as its root directory and bind-mounts the disk image into
it, reports what it sees of itself (PID, host name, kernel release,
namespaces, mounts, network interfaces, the cgroup's limits, all read from
inside), then runs the workloads with ``blockload.run_native`` on the
bind-mounted image, or for the start-up measurement reads the image's
first 4 KiB and waits.

The cgroup is a child of the cgroup this process is in (the machine's
accounting of us stays whole).  On every path out, the container is
killed by PID (its namespace and mounts die with its PID 1), whatever
still sits in the cgroup is killed by PID, and the cgroup is removed.

Where the mechanism is missing (no ``unshare``, namespaces refused, no
cgroup with cpu and memory, or ``PVBUS_NO_CONTAINER`` set) ``unavailable``
says why, and the caller runs the plain process instead under a label of
its own: never silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

NAMESPACES = ("mnt", "pid", "uts", "ipc", "net")
DISABLE_ENV = "PVBUS_NO_CONTAINER"
HOSTNAME = "pvbus-container"
CPU_LIMIT = 1.0  # CPUs
MEMORY_LIMIT = 256 << 20  # bytes
PERIOD_US = 100_000
FIRST_IO_BYTES = 4096
# the wrapper that joins the cgroup before anything of the container runs
JOIN = 'for f in $PVBUS_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done; exec "$@"'
_serial = itertools.count()


# -- cgroups --------------------------------------------------------------------------------------------------


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of every cgroup file system."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _, options = right.split()[:3]
        if fstype in ("cgroup", "cgroup2"):
            out.append((left.split()[4], fstype, set(options.split(","))))
    return out


@dataclass
class CgroupLayout:
    """Where a cgroup's files are: v2, one directory; v1, one per controller."""

    version: int
    dirs: dict[str, Path]  # v2: {"": dir}; v1: {"cpu": .., "cpuacct": .., "memory": ..}

    @classmethod
    def of_process(cls, pid: str = "self") -> CgroupLayout | None:
        """The layout holding ``pid`` (read from inside, it is the container's own)."""
        own = {}
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                own[c] = path.lstrip("/")
        return cls._find(own)

    @classmethod
    def _find(cls, own: dict[str, str]) -> CgroupLayout | None:
        mounts = _mounts()
        for point, fstype, _ in mounts:
            if fstype == "cgroup2" and "" in own:
                controllers = Path(point, "cgroup.controllers")
                if controllers.exists() and {"cpu", "memory"} <= set(controllers.read_text().split()):
                    return cls(2, {"": Path(point, own[""])})
        dirs: dict[str, Path] = {}
        for want in ("cpu", "cpuacct", "memory"):
            for point, fstype, options in mounts:
                if fstype == "cgroup" and want in options and want in own:
                    dirs[want] = Path(point, own[want])
        return cls(1, dirs) if len(dirs) == 3 else None

    def procs_files(self) -> list[Path]:
        return sorted({d / "cgroup.procs" for d in self.dirs.values()})

    def limits(self) -> dict[str, Any]:
        """The CPU limit (CPUs) and memory limit (bytes), as the files say."""
        if self.version == 2:
            d = self.dirs[""]
            quota, period = (d / "cpu.max").read_text().split()
            mem = (d / "memory.max").read_text().strip()
            return {"cpu.max": f"{quota} {period}", "memory.max": mem,
                    "cpus": None if quota == "max" else int(quota) / int(period),
                    "memory_bytes": None if mem == "max" else int(mem)}
        quota_us = int((self.dirs["cpu"] / "cpu.cfs_quota_us").read_text())
        period_us = int((self.dirs["cpu"] / "cpu.cfs_period_us").read_text())
        limit = int((self.dirs["memory"] / "memory.limit_in_bytes").read_text())
        return {"cpu.cfs_quota_us": quota_us, "cpu.cfs_period_us": period_us, "memory.limit_in_bytes": limit,
                "cpus": None if quota_us < 0 else quota_us / period_us, "memory_bytes": limit}

    def usage(self) -> dict[str, Any]:
        """Peak memory (bytes) and CPU time (seconds) the cgroup's processes used."""
        if self.version == 2:
            d = self.dirs[""]
            stat = dict(line.split() for line in (d / "cpu.stat").read_text().splitlines())
            peak = d / "memory.peak"
            return {"memory_peak_bytes": int(peak.read_text()) if peak.exists() else None,
                    "cpu_s": int(stat["usage_usec"]) / 1e6, "source": "memory.peak, cpu.stat usage_usec"}
        return {"memory_peak_bytes": int((self.dirs["memory"] / "memory.max_usage_in_bytes").read_text()),
                "cpu_s": int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9,
                "source": "memory.max_usage_in_bytes, cpuacct.usage"}


class Cgroup:
    """A cgroup of our own, a child of this process's, with CPU and memory limits."""

    def __init__(self, cpus: float = CPU_LIMIT, memory: int = MEMORY_LIMIT) -> None:
        base = CgroupLayout._find({c: p.lstrip("/") for c, p in _own_paths().items()})
        if base is None:
            raise OSError("no cgroup with the cpu and memory controllers")
        name = f"pvbus-container-{os.getpid()}-{next(_serial)}"
        self.layout = CgroupLayout(base.version, {c: d / name for c, d in base.dirs.items()})
        made: list[Path] = []
        try:
            for d in sorted(set(self.layout.dirs.values())):
                if base.version == 2:  # the parent must hand cpu and memory down
                    control = d.parent / "cgroup.subtree_control"
                    if not {"cpu", "memory"} <= set(control.read_text().split()):
                        control.write_text("+cpu +memory")
                d.mkdir()
                made.append(d)
            quota = int(cpus * PERIOD_US)
            if base.version == 2:
                (self.layout.dirs[""] / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                (self.layout.dirs[""] / "memory.max").write_text(str(memory))
            else:
                (self.layout.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (self.layout.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
                (self.layout.dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory))
        except BaseException:
            for d in reversed(made):
                d.rmdir()
            raise

    def pids(self) -> set[int]:
        return {int(p) for f in self.layout.procs_files() if f.exists() for p in f.read_text().split()}

    def remove(self) -> None:
        """Kill by PID whatever is still in it (only the container's processes
        can be), then remove it; retried while the kernel lets go of them."""
        deadline = time.monotonic() + 10
        for d in sorted(set(self.layout.dirs.values()), reverse=True):
            while d.exists():
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)


# -- whether this machine can do it ---------------------------------------------------------------------------


def unshare_argv() -> list[str]:
    return ["unshare", *(f"--{'mount' if ns == 'mnt' else ns}" for ns in NAMESPACES), "--fork", "--kill-child",
            "--mount-proc"]


@lru_cache(maxsize=1)
def _probe() -> str | None:
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    try:
        res = subprocess.run([*unshare_argv(), "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare did not run: {e}"
    if res.returncode != 0:
        return f"the kernel refused new namespaces: {res.stderr.decode().strip()[-200:]}"
    try:
        Cgroup().remove()
    except OSError as e:
        return f"no cgroup of our own with CPU and memory limits: {e}"
    return None


def unavailable() -> str | None:
    """Why the container cannot be made here, or None when it can."""
    if os.environ.get(DISABLE_ENV):
        return f"disabled by {DISABLE_ENV}"
    return _probe()


def mechanism() -> str:
    layout = CgroupLayout._find({c: p.lstrip("/") for c, p in _own_paths().items()})
    version = f"v{layout.version}" if layout else "?"
    return (f"namespaces {', '.join(NAMESPACES)} (util-linux unshare, own /proc) + cgroup {version} "
            f"(cpu {CPU_LIMIT:g} CPU, memory {MEMORY_LIMIT >> 20} MiB), image bind-mounted")


def host_view() -> dict[str, Any]:
    """What the host sees, to set beside what the container sees."""
    return {"kernel": os.uname().release, "hostname": socket.gethostname(), "pid": os.getpid(),
            "namespaces": {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES}}


# -- a running container ----------------------------------------------------------------------------------------


@dataclass
class Container:
    """A started container: its ``unshare`` process, its cgroup, what it said
    of itself (``identity``) and its JSON lines after that."""

    process: subprocess.Popen[bytes]
    cgroup: Cgroup
    root: str
    identity: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> Iterator[dict[str, Any]]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            yield json.loads(line)

    def pids(self) -> set[int]:
        return self.cgroup.pids()

    def stop(self) -> None:
        """Kill by PID (the namespace, its mounts and processes go with PID 1),
        then remove the cgroup; safe to call twice."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        if self.cgroup.layout.dirs and any(d.exists() for d in self.cgroup.layout.dirs.values()):
            self.cgroup.remove()
        shutil.rmtree(self.root, ignore_errors=True)


def start(image: str, task: dict[str, Any], cpus: float = CPU_LIMIT, memory: int = MEMORY_LIMIT) -> Container:
    """Start a container on ``image`` doing ``task`` ({"workloads": [...]} or
    {"first_io": true}); returns once it has reported its identity."""
    cgroup = Cgroup(cpus, memory)
    root = tempfile.mkdtemp(prefix="pvbus-container-")
    env = {**os.environ, "PVBUS_CGROUP_PROCS": " ".join(map(str, cgroup.layout.procs_files()))}
    inside = [sys.executable, "-m", "pvbus.bench.container", os.path.abspath(image), root, json.dumps(task)]
    try:
        proc = subprocess.Popen(["sh", "-c", JOIN, "sh", *unshare_argv(), *inside], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except BaseException:
        cgroup.remove()
        shutil.rmtree(root, ignore_errors=True)
        raise
    box = Container(proc, cgroup, root)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        if not first:
            proc.wait(timeout=30)
            raise RuntimeError(f"the container did not start (status {proc.returncode}): "
                               f"{proc.stderr.read().decode().strip()[-500:]}")
        box.identity = json.loads(first)["identity"]
        return box
    except BaseException:
        box.stop()
        raise


@contextlib.contextmanager
def running(image: str, task: dict[str, Any], **limits: Any) -> Iterator[Container]:
    box = start(image, task, **limits)
    try:
        yield box
    finally:
        box.stop()


def run_workloads(image: str, workloads: list[Any], progress: Any = None) -> dict[str, Any]:
    """The workloads in one container on ``image``: the records (mode
    ``container``), what the container saw of itself, and the cgroup's
    limits and usage."""
    from dataclasses import asdict

    with running(image, {"workloads": [asdict(w) for w in workloads]}) as box:
        records = []
        for rec in box.lines():
            records.append(rec)
            if progress:
                progress(f"container {rec['rw']} {rec['bs']} qd{rec['iodepth']}: {rec['mb_per_s']:,.3f} MB/s")
        if box.process.wait(timeout=60) != 0:
            assert box.process.stderr is not None
            raise RuntimeError(f"the container's workload failed: {box.process.stderr.read().decode()[-2000:]}")
        usage = box.cgroup.layout.usage()
    return {"records": records, "identity": box.identity, "host": host_view(), "cgroup_usage": usage}


# -- inside the container (PID 1) -----------------------------------------------------------------------------


def _identity(root: str, image_inside: str) -> dict[str, Any]:
    layout = CgroupLayout.of_process()
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if root in line.split()[4]]
    return {
        "pid": os.getpid(), "hostname": socket.gethostname(), "kernel": os.uname().release,
        "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "namespaces": {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES},
        "mounts": [" ".join(line.split()[4:5] + line.split(" - ")[1].split()[:2]) for line in mounts],
        "net_interfaces": [name for _, name in socket.if_nameindex()],
        "cgroup_version": layout.version if layout else None,
        "cgroup_limits": layout.limits() if layout else None,
        "image": image_inside,
    }


def inside(image: str, root: str, task: dict[str, Any]) -> int:
    socket.sethostname(HOSTNAME)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "pvbus-root", root], check=True)
    image_inside = os.path.join(root, "disk.img")
    Path(image_inside).touch()
    subprocess.run(["mount", "--bind", image, image_inside], check=True)
    print(json.dumps({"identity": _identity(root, image_inside)}), flush=True)
    if task.get("first_io"):
        fd = os.open(image_inside, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, FIRST_IO_BYTES, 0)
        print(json.dumps({"first_io": hashlib.sha256(data).hexdigest()}), flush=True)
        sys.stdin.read()  # rest until told to go (EOF) or killed
        os.close(fd)
        return 0
    from .blockload import Workload, run_native

    for spec in task["workloads"]:
        print(json.dumps(run_native(image_inside, Workload(**spec), mode="container")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(inside(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
