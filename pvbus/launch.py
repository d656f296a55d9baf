"""The process-level commands: ``pvbus host``, ``guest``, ``run``, ``inspect``.

``host`` runs the host service in the foreground and prints one line,
``ready <socket>``, once it accepts guests (``run`` and the tests wait for
it); SIGTERM or SIGINT stop it cleanly.  ``guest`` boots a guest kernel
against a host, runs a guest program and shuts down, exiting with the
program's status.  ``run`` starts both as a pair and returns the guest
program's status.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

import trio

from vmbus import protocol as P
from vmbus.device import load_devices

log = logging.getLogger("pvbus")


def parse_versions(text: str | None) -> tuple[int, ...] | None:
    """``5.3,5.2,4.0`` -> protocol version numbers (major << 16 | minor)."""
    if not text:
        return None
    out = []
    for item in text.split(","):
        major, minor = item.strip().split(".")
        out.append((int(major) << 16) | int(minor))
    return tuple(out)


def _select_devices(names: list[str] | None, config: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The named devices, or every installed one whose configuration we have."""
    devices = load_devices()
    if not names:
        return {n: d for n, d in devices.items() if not d.needs_config or n in (config or {})}
    missing = [n for n in names if n not in devices]
    if missing:
        raise SystemExit(f"unknown device(s) {', '.join(missing)}; installed: {', '.join(sorted(devices))}")
    return {n: devices[n] for n in names}


async def _until_signal(cancel: trio.CancelScope, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Cancel ``cancel`` on SIGTERM or SIGINT.  Start it with ``nursery.start``:
    it reports started once the handlers are in place, so a signal that comes
    right after (a program that says it booted, then gets stopped) is not
    taken by the default action."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            cancel.cancel()
            return


async def _until_shutdown_request(kernel: Any, cancel: trio.CancelScope) -> None:
    """Cancel ``cancel`` (the guest program) once the host asks for a shutdown
    through the shutdown integration service; the guest then shuts down
    cleanly and exits 0.  A guest offered no shutdown device waits for none."""
    from vmbus.errors import ChannelRevoked

    try:
        requested = kernel.device("shutdown").requested
    except (LookupError, ChannelRevoked):
        return
    await requested.wait()
    cancel.cancel()


def disk_config(path: str | None, size: str | None, read_only: bool) -> dict[str, dict[str, Any]]:
    if not path:
        return {}
    cfg: dict[str, Any] = {"path": path, "read_only": read_only}
    if size:
        cfg["size"] = parse_size(size)
    return {"storage": cfg}


def parse_size(text: str) -> int:
    """``4k``, ``64KiB``, ``1M``, ``2G`` or plain bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t[-1:] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


async def host_main(socket_path: str, device_names: list[str] | None, versions: str | None,
                    config: dict[str, dict[str, Any]] | None = None, emulated_disks: bool = False,
                    group: str | None = None) -> int:
    from vmbus.access import HostSocketError
    from vmbus.host import HostService
    from vmbus.server import HOST_VERSIONS

    devices = _select_devices(device_names, config)
    for name, spec in devices.items():
        if spec.needs_config and name not in (config or {}):
            raise SystemExit(f"device {name} needs its configuration (for storage: --disk PATH)")
    service = HostService(socket_path, devices.values(), versions=parse_versions(versions) or HOST_VERSIONS,
                          device_config=config, emulated_disks=emulated_disks, group=group)
    try:
        service.bind()  # a socket in use, or a missing group: one line, before anything starts
    except HostSocketError as exc:
        raise SystemExit(f"pvbus host: {exc}") from None
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as serving:  # SIGTERM/SIGINT end this; then the guests are told
            await nursery.start(_until_signal, serving)
            await nursery.start(service.run)
            print(f"ready {socket_path}", flush=True)
            await trio.sleep_forever()
        await service.shutdown()
        nursery.cancel_scope.cancel()
    return 0


async def guest_main(socket_path: str, program: str, argv: list[str], ram_mib: int, versions: str | None) -> int:
    from guest_kernel.kernel import GuestKernel

    from .programs import resolve

    func = resolve(program)
    kernel = GuestKernel(load_devices(), ram_size=ram_mib << 20,
                         versions=parse_versions(versions) or P.GUEST_VERSIONS)
    status = 1
    try:
        async with trio.open_nursery() as nursery:
            await kernel.boot(socket_path, nursery)
            with trio.CancelScope() as program_scope:
                await nursery.start(_until_signal, program_scope)
                nursery.start_soon(_until_shutdown_request, kernel, program_scope)
                status = await func(kernel, argv)
            if program_scope.cancelled_caught:
                status = 0  # asked to stop: shut down cleanly and say so
            await kernel.shutdown()
            nursery.cancel_scope.cancel()
    except* (ConnectionError, BrokenPipeError, ConnectionResetError) as group:
        print(f"pvbus guest: the host went away ({group.exceptions[0]})", file=sys.stderr)
        status = 1
    finally:
        kernel.close()
    return status


async def run_main(program: str, argv: list[str], device_names: list[str] | None, ram_mib: int,
                   host_args: list[str] | None = None) -> int:
    """Start a host and a guest as a pair; return the guest program's status."""
    with tempfile.TemporaryDirectory(prefix="pvbus-") as tmp:
        sock = os.path.join(tmp, "host.sock")
        host_cmd = [sys.executable, "-m", "pvbus", "host", "--socket", sock, *(host_args or [])]
        for name in device_names or []:
            host_cmd += ["--device", name]
        async with trio.open_nursery() as nursery:
            host = await trio.lowlevel.open_process(host_cmd, stdout=subprocess.PIPE)
            try:
                assert host.stdout is not None
                line = b""
                with trio.fail_after(30):
                    while not line.endswith(b"\n"):
                        chunk = await host.stdout.receive_some(1)
                        if not chunk:
                            raise SystemExit("the host exited before it was ready")
                        line += chunk
                guest_cmd = [sys.executable, "-m", "pvbus", "guest", "--socket", sock, "--ram", str(ram_mib),
                             "--program", program, "--", *argv]
                guest = await trio.run_process(guest_cmd, check=False)
                return guest.returncode
            finally:
                host.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await host.wait()
                if host.returncode is None:
                    host.kill()
                    await host.wait()
                nursery.cancel_scope.cancel()


async def inspect_main(socket_path: str) -> int:
    from vmbus.admin import admin_request

    print(json.dumps(await admin_request(socket_path, {"cmd": "inspect"}), indent=2))
    return 0


def storage_demo(image: str | None, size: str | None, writable: bool = False) -> int:
    """``pvbus run`` with no program: a host with a disk image and a guest
    that boots, finds the disk and runs a short sequential and random
    workload, shown beside the same workload run natively on the host.

    The demo writes only what it created or was allowed to write: with no
    ``image`` it lays out a temporary one (removed after); a path that does
    not exist becomes a new image of ``size`` (kept); an existing file or
    block device is the user's disk, used as it is (never re-laid or
    resized), read-only with only the read workloads unless ``writable``."""
    import stat

    from .bench import blockbench
    from .bench.blockload import Workload
    from .errors import UsageError

    region = (parse_size(size) if size else 128 << 20) >> 20 << 20  # whole MiB: every block size divides it
    read_only = False
    if image is not None and os.path.lexists(image):
        if size:
            raise UsageError(f"--disk-size is for a new image; {image} exists and is never resized (drop --disk-size)")
        try:
            mode = os.stat(image).st_mode
            have = blockbench.disk_size(image) if stat.S_ISREG(mode) or stat.S_ISBLK(mode) else -1
        except OSError as exc:
            raise UsageError(f"cannot open the disk {image}: {exc.strerror}") from None
        if have < 0:
            raise UsageError(f"{image} is neither a disk image file nor a block device")
        region = min(region, have) >> 20 << 20
        if not region:
            raise UsageError(f"{image} holds {have} bytes; the demo needs a disk of at least 1 MiB")
        read_only = not writable
        if read_only:
            print(f"pvbus run: using {image} read-only, as it is: only the read workloads run "
                  f"(--writable lets the write workloads overwrite its first {region >> 20} MiB)", file=sys.stderr)
        else:
            print(f"pvbus run: using {image} writable: the write workloads overwrite its first "
                  f"{region >> 20} MiB with random data", file=sys.stderr)
    elif not region:
        raise UsageError(f"--disk-size {size} is under the demo's smallest disk, 1 MiB")
    elif image is not None:
        try:
            blockbench.lay_out(image, region)  # a new image, made here (exclusive creation), kept after
        except OSError as exc:
            raise UsageError(f"cannot create the disk image {image}: {exc.strerror}") from None
        print(f"pvbus run: created {image} ({region >> 20} MiB of random data)", file=sys.stderr)
    workloads = [Workload(w.rw, w.bs, w.iodepth, region, w.runtime, w.ramp)
                 for w in blockbench.DEMO if not (read_only and w.write)]
    from rich.console import Console

    with Console(stderr=True).status("starting") as status:
        result = blockbench.run(workloads, progress=status.update, image=image, read_only=read_only)
    blockbench.render_demo(result)
    return 0
