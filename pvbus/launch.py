"""The process-level commands: ``pvbus host``, ``guest``, ``run``, ``inspect``.

``host`` runs the host service in the foreground and prints one line,
``ready <socket>``, once it accepts guests (``run`` and the tests wait for
it); SIGTERM or SIGINT stop it cleanly.  ``guest`` boots a guest kernel
against a host, runs a guest program and shuts down, exiting with the
program's status.  ``run`` starts both as a pair and returns the guest
program's status.

Whatever a user can get wrong is checked before anything starts (sizes,
versions, the program, the socket's directory, the disk: a host says
``ready`` only once it could serve a guest), and every failure becomes one
``CommandError`` line: a missing or stale socket, a host that refuses our
versions or goes away, a program that fails.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Any

import trio

from vmbus import protocol as P
from vmbus.config import parse_size as parse_size
from vmbus.device import load_devices

from .errors import CommandError, UsageError, describe, leaves

log = logging.getLogger("pvbus")
MIN_RAM_MIB = 8  # the rings of every shipped device, the SynIC pages and I/O buffers, with room
HOST_START_TIMEOUT = 30.0  # seconds for ``run``'s host to say ready (generous: a loaded machine)
UNIX_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), the terminating NUL included (unix(7))
EMULATED_DISK_CONTROLLERS = ("ide", "dma")  # trapped devices behind --emulated-disks


def _version_name(version: int) -> str:
    return f"{version >> 16}.{version & 0xFFFF}"


def parse_versions(text: str | None) -> tuple[int, ...] | None:
    """``5.3,5.2,4.0`` -> protocol version numbers (major << 16 | minor);
    ValueError, in words, for anything but known VMBus versions."""
    if not text:
        return None
    known = {_version_name(v): int(v) for v in P.Version}
    out = []
    for item in text.split(","):
        if item.strip() not in known:
            raise ValueError(f"{item.strip()!r} is not a VMBus version; known: {', '.join(known)} "
                             "(give a comma-separated list, e.g. 5.3,4.0)")
        out.append(known[item.strip()])
    return tuple(out)


def ram_limit_mib() -> int:
    """The most guest RAM a guest may ask for: this machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


def check_ram(mib: int) -> int:
    """Guest RAM in MiB, refused (ValueError, in words) outside what a guest
    can boot with and this machine can back."""
    if mib < MIN_RAM_MIB:
        raise ValueError(f"{mib} MiB of guest RAM is too little: the minimum is {MIN_RAM_MIB} MiB")
    if mib > ram_limit_mib():
        raise ValueError(f"{mib:,} MiB of guest RAM is more than this machine's {ram_limit_mib():,} MiB of memory")
    return mib


def _select_devices(names: list[str] | None, config: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The named devices (``NAME`` or ``NAME:key=value,...``, whose options
    are merged into ``config``), or every installed one whose configuration
    we have.  Each selected device's configuration is then checked against
    what the device declares (``vmbus.config``)."""
    from vmbus.config import ConfigError, build_config, parse_device_argument

    devices = load_devices()
    if config is None:
        config = {}
    try:
        if names:
            chosen: dict[str, Any] = {}
            for argument in names:
                name, options = parse_device_argument(argument)
                if name not in devices:
                    raise UsageError(f"unknown device {name}; installed: {', '.join(sorted(devices))}")
                chosen[name] = devices[name]
                if options and devices[name].config_schema is None:
                    raise UsageError(f"device {name} takes no options (given: {', '.join(options)})")
                if options:
                    config[name] = {**config.get(name, {}), **options}
        else:
            chosen = {n: d for n, d in devices.items() if not d.needs_config or n in config}
        for name in [n for n in config if n in chosen]:
            config[name] = build_config(name, chosen[name].config_schema, config[name])
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return chosen


async def _until_signal(cancel: trio.CancelScope, caught: list[int] | None = None, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Cancel ``cancel`` on SIGTERM or SIGINT (noted in ``caught``).  Start it
    with ``nursery.start``: it reports started once the handlers are in
    place, so a signal that comes right after (a program that says it
    booted, then gets stopped) is not taken by the default action.  It
    keeps the handlers until it is itself cancelled: a second signal while
    the process stops cleanly changes nothing (it would otherwise meet the
    default action and cut the clean stop short)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if caught is not None:
                caught.append(signum)
            cancel.cancel()


async def _boot(kernel: Any, socket_path: str, nursery: trio.Nursery) -> None:
    """Boot ``kernel``; SIGINT or SIGTERM meanwhile stops it at once, as
    Ctrl-C (status 130) or as asked (128 + 15), without a word: a boot that
    waits for a silent host is interrupted as reliably as a program is."""
    caught: list[int] = []
    with trio.CancelScope() as booting:
        async with trio.open_nursery() as watch:
            await watch.start(_until_signal, booting, caught)
            await kernel.boot(socket_path, nursery)
            watch.cancel_scope.cancel()
    if caught and caught[0] == signal.SIGINT:
        raise KeyboardInterrupt
    if caught:
        raise SystemExit(128 + caught[0])


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



def _trapped_devices(emulated_disks: bool, config: dict[str, dict[str, Any]] | None
                     ) -> list[tuple[Any, dict[str, Any]]]:
    """``--emulated-disks``: the emulated IDE and DMA disk controllers
    (trapped devices), each on the storage device's image."""
    if not emulated_disks:
        return []
    storage = (config or {}).get("storage")
    if not storage:
        raise UsageError("--emulated-disks puts emulated controllers on the disk image: give --disk PATH too")
    from vmbus.trapped import load_trapped_devices

    installed = load_trapped_devices()
    missing = [name for name in EMULATED_DISK_CONTROLLERS if name not in installed]
    if missing:
        raise UsageError(f"trapped device(s) {', '.join(missing)} not installed (reinstall pvbus)")
    return [(installed[name], storage) for name in EMULATED_DISK_CONTROLLERS]


async def host_main(socket_path: str, device_names: list[str] | None, versions: str | None,
                    config: dict[str, dict[str, Any]] | None = None, emulated_disks: bool = False,
                    group: str | None = None) -> int:
    from vmbus.access import HostSocketError
    from vmbus.host import HostService
    from vmbus.server import HOST_VERSIONS

    config = dict(config or {})
    devices = _select_devices(device_names, config)
    for name, spec in devices.items():
        if spec.needs_config and name not in (config or {}):
            raise UsageError(f"device {name} needs its configuration (for storage: --disk PATH)")
    _check_socket_directory(socket_path)
    if "storage" in devices and config and "storage" in config:
        check_disk(config["storage"])
    service = HostService(socket_path, devices.values(), versions=parse_versions(versions) or HOST_VERSIONS,
                          device_config=config, trapped=_trapped_devices(emulated_disks, config), group=group)
    try:
        service.bind()  # a socket in use, or a missing group: one line, before anything starts
    except HostSocketError as exc:
        raise CommandError(str(exc)) from None
    try:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as serving:  # SIGTERM/SIGINT end this; then the guests are told
                await nursery.start(_until_signal, serving)
                await nursery.start(service.run)
                print(f"ready {socket_path}", flush=True)
                await trio.sleep_forever()
            await service.shutdown()
            nursery.cancel_scope.cancel()
    except* OSError as group:
        raise CommandError(f"cannot listen on {socket_path}: {_reason(leaves(group)[0])}") from group
    return 0


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else describe(exc)


def _check_socket_directory(socket_path: str) -> None:
    """The directory a host's socket goes in must be there and writable
    (else the bind fails later with no path named)."""
    if too_long := _socket_path_too_long(socket_path):
        raise UsageError(too_long)
    directory = os.path.dirname(os.path.abspath(socket_path))
    if not os.path.isdir(directory):
        raise CommandError(f"cannot listen on {socket_path}: there is no directory {directory} "
                           "(create it, or give a --socket path in an existing directory)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CommandError(f"cannot listen on {socket_path}: the directory {directory} is not writable")


def check_disk(config: dict[str, Any]) -> None:
    """Open the storage device's disk as its backend will (creating a
    missing image only when given a size), so a host refuses a disk it
    could not serve before it says ``ready``, not when a guest connects."""
    from host_drivers.storage.backend import DiskImage

    path = str(config["path"])
    if os.path.isdir(path):
        raise CommandError(f"disk {path} is a directory: give an image file or a block device")
    if not os.path.exists(path) and "size" not in config:
        raise CommandError(f"disk {path} does not exist: give --disk-size to create it (e.g. --disk-size 1G)")
    try:
        disk = DiskImage(path, size=config.get("size"), read_only=bool(config.get("read_only")))
    except OSError as exc:
        writing = isinstance(exc, PermissionError) and not config.get("read_only")
        hint = " (or offer it with --read-only)" if writing else ""
        raise CommandError(f"cannot open disk {path}: {_reason(exc)}{hint}") from exc
    try:
        mode = os.fstat(disk.fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise CommandError(f"disk {path} is neither a file nor a block device")
        if disk.blocks == 0:
            raise CommandError(f"disk {path} is empty (under one {disk.block_size}-byte block)")
    finally:
        disk.close()


def check_address(text: str) -> str:
    """``ADDR/PREFIX`` for a guest's interface; ValueError, in words, otherwise."""
    import ipaddress

    if "/" not in text:
        raise ValueError(f"{text!r}: give the address with its prefix length, e.g. 10.0.0.2/24")
    ipaddress.ip_interface(text)
    return text


async def present_network(kernel: Any, network: dict[str, Any] | None) -> None:
    """A guest offered a NIC shows it to its programs as ``eth0`` in its
    network namespace (``guest_kernel.drivers.netvsc``), addressed as
    ``--ip``/``--gateway`` say."""
    from vmbus.errors import ChannelRevoked

    try:
        nic = kernel.device("net")
    except (LookupError, ChannelRevoked):
        if network and network.get("address"):
            raise CommandError("--ip is for a guest with a net device: start the host with --device net:...") from None
        return
    network = network or {}
    try:
        name = await nic.present(netns=network.get("netns"), address=network.get("address"),
                                 gateway=network.get("gateway"))
    except OSError as exc:
        raise CommandError(f"cannot show the NIC as eth0: {_reason(exc)} (needs root and /dev/net/tun)") from exc
    log.info("net: eth0 in network namespace %s", name)


async def guest_main(socket_path: str, program: str, argv: list[str], ram_mib: int, versions: str | None,
                     exec_argv: list[str] | None = None, mounts: list[str] | None = None,
                     network: dict[str, Any] | None = None) -> int:
    """Boot a guest and run ``program`` in it, or with ``exec_argv`` a real
    program in the guest's namespaces, its disks mounted as ``mounts`` say
    (``guest_kernel.presenters.command``)."""
    from guest_kernel.kernel import GuestKernel

    from .programs import resolve

    if exec_argv is not None:
        func, program = exec_program(exec_argv, mounts or []), exec_argv[0] if exec_argv else "--exec"
    else:
        func = resolve(program)
    offered = parse_versions(versions) or P.GUEST_VERSIONS
    try:
        kernel = GuestKernel(load_devices(), ram_size=ram_mib << 20, versions=offered)
    except (OSError, MemoryError) as exc:
        raise CommandError(f"cannot allocate {ram_mib:,} MiB of guest RAM: {_reason(exc)} "
                           "(give less with --ram)") from exc
    status = 1
    failure: CommandError | None = None
    booted = False
    try:
        async with trio.open_nursery() as nursery:
            await _boot(kernel, socket_path, nursery)
            booted = True
            await present_network(kernel, network)
            with trio.CancelScope() as program_scope:
                if exec_argv is None:  # a real program gets the signals itself (relayed)
                    await nursery.start(_until_signal, program_scope)
                nursery.start_soon(_until_shutdown_request, kernel, program_scope)
                status, failure = await _run_program(kernel, program, func, argv)
            if program_scope.cancelled_caught:
                status = 0  # asked to stop: shut down cleanly and say so
            await kernel.shutdown()
            nursery.cancel_scope.cancel()
    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - each becomes one line, or goes on as it was
        explained = _guest_failure(kernel, exc, socket_path, ram_mib, offered, booted)
        if explained is exc:
            raise
        raise explained from exc
    finally:
        kernel.close()
    if failure is not None:
        raise failure
    return status


def exec_program(argv: list[str], mounts: list[str]) -> Any:
    """``--exec -- CMD ARGS...`` as a guest program: CMD run in the guest's
    namespaces with its disks presented and ``mounts`` (``disk0:/mnt[:ext4]``)
    mounted; its problems as one ``CommandError`` line."""
    from guest_kernel.presenters.command import CommandFailed, MountRequest, run_command

    try:
        requests = [MountRequest.parse(text) for text in mounts]
    except ValueError as exc:
        raise UsageError(f"--mount {exc}") from None
    if not argv:
        raise UsageError("--exec needs a command after --, e.g. --exec -- sh -c 'echo hello'")

    async def program(kernel: Any, _argv: list[str]) -> int:
        try:
            return await run_command(kernel, argv, requests)
        except CommandFailed as exc:
            raise CommandError(str(exc)) from exc

    return program


async def _run_program(kernel: Any, name: str, func: Any, argv: list[str]) -> tuple[int, CommandError | None]:
    """Run the guest program: its status, or what it failed with as one
    line (the kernel is shut down cleanly either way; a failure caused by
    the host going away is left to the caller, which says so)."""
    from guest_kernel.kernel import DeviceState
    from guest_kernel.memory import OutOfGuestMemory
    from vmbus.errors import ChannelRevoked, HostGone

    try:
        status = await func(kernel, argv)
        return (0 if status is None else int(status)), None
    except Exception as exc:  # noqa: BLE001 - the user's program: reported in one line (a cancel passes)
        found = leaves(exc)
        if kernel.host_gone or any(isinstance(e, HostGone) for e in found):
            raise
        usage = next((e for e in found if isinstance(e, CommandError)), None)
        if usage is not None:
            return usage.exit_status, usage
        revoked = next((e for e in found if isinstance(e, ChannelRevoked)), None)
        short = next((e for e in found if isinstance(e, OutOfGuestMemory)), None)
        if short is not None:
            failure = CommandError(f"program {name} ran out of guest RAM ({short}): "
                                   f"give more than {kernel.ram.size >> 20} MiB with --ram")
        elif revoked is not None:
            gone = sorted({d.name for d in kernel.devices.values() if d.state is DeviceState.RESCINDED})
            failure = CommandError(f"the host removed {'device ' + ', '.join(gone) if gone else 'a device'} "
                                   f"while program {name} used it ({revoked})")
        else:
            failure = CommandError(f"program {name} failed: {describe(found[0])}")
        failure.__cause__ = exc
        return 1, failure


def _guest_failure(kernel: Any, exc: BaseException, socket_path: str, ram_mib: int,
                   offered: tuple[int, ...], booted: bool) -> BaseException:
    """What to tell the user about a guest that could not go on: one line
    for each known cause, else the exception as it was."""
    from guest_kernel.memory import OutOfGuestMemory
    from vmbus.errors import BootError, HostGone, HypercallFailed, NoCommonVersion

    found = leaves(exc)
    if kernel.host_gone:
        return CommandError(kernel.host_gone)
    for e in found:
        if isinstance(e, OSError) and kernel.hypercalls is None:  # connecting failed
            return CommandError(connect_problem(socket_path, e))
        if isinstance(e, CommandError):
            return e
        if isinstance(e, HostGone):
            return CommandError(str(e))
        if isinstance(e, NoCommonVersion):
            return CommandError(f"{e} ({', '.join(map(_version_name, offered))}): offer one it accepts with "
                                "--versions, or omit --versions for all of ours")
        if isinstance(e, (BootError, HypercallFailed)):
            return CommandError(f"the host refused a request: {e}" if booted else f"the guest could not boot: {e}")
        if isinstance(e, OutOfGuestMemory):
            return CommandError(f"{ram_mib} MiB of guest RAM is not enough for the host's devices ({e}): "
                                "give more with --ram")
    return exc


def _socket_path_too_long(socket_path: str) -> str | None:
    size = len(os.fsencode(socket_path))
    if size < UNIX_PATH_MAX:
        return None
    return (f"the socket path {socket_path} is {size} bytes; an AF_UNIX path has at most {UNIX_PATH_MAX - 1}: "
            "choose a shorter one")


def connect_problem(socket_path: str, exc: OSError) -> str:
    """Why connecting to a host's socket failed, and what to do, in words."""
    if too_long := _socket_path_too_long(socket_path):
        return too_long
    start = f"start one with 'pvbus host --socket {socket_path}'"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"no host socket at {socket_path}: {start}"
    if exc.errno == errno.ECONNREFUSED:
        if os.path.exists(socket_path) and not stat.S_ISSOCK(os.stat(socket_path).st_mode):
            return f"{socket_path} is not a socket: give the path the host was started with (pvbus host --socket)"
        return f"no host is listening on {socket_path} (the file is left from one that stopped): {start}"
    if exc.errno == errno.EACCES:
        return f"cannot connect to {socket_path}: permission denied"
    return f"cannot connect to {socket_path}: {_reason(exc)}"


async def run_main(program: str, argv: list[str], device_names: list[str] | None, ram_mib: int,
                   host_args: list[str] | None = None, pvbus_options: list[str] | None = None,
                   exec_mode: bool = False, mounts: list[str] | None = None) -> int:
    """Start a host and a guest as a pair; return the guest program's status
    (with ``exec_mode``: ``argv`` is a real program run in the guest, its
    disks mounted as ``mounts`` say).  ``pvbus_options`` (``--debug``,
    ``--log-level``) go to both."""
    from .programs import resolve

    if exec_mode:
        exec_program(argv, mounts or [])  # a bad --mount or no command: refused before anything starts
        guest_args = ["--exec", *(f"--mount={m}" for m in mounts or [])]
    else:
        resolve(program)  # a program that cannot run is refused before anything starts
        guest_args = ["--program", program]
    pvbus = [sys.executable, "-m", "pvbus", *(pvbus_options or [])]
    with tempfile.TemporaryDirectory(prefix="pvbus-") as tmp:
        sock = os.path.join(tmp, "host.sock")
        host_cmd = [*pvbus, "host", "--socket", sock, *(host_args or [])]
        for name in device_names or []:
            host_cmd += ["--device", name]
        async with trio.open_nursery() as nursery:
            host = await trio.lowlevel.open_process(host_cmd, stdout=subprocess.PIPE)
            try:
                assert host.stdout is not None
                line = b""
                with trio.move_on_after(HOST_START_TIMEOUT):
                    while not line.endswith(b"\n"):
                        chunk = await host.stdout.receive_some(1)
                        if not chunk:
                            code = await host.wait()
                            if code > 0:
                                return code  # it said why, on stderr
                            raise CommandError(f"the host exited before it was ready (status {code})")
                        line += chunk
                if not line.endswith(b"\n"):
                    raise CommandError(f"the host did not say it was ready within {HOST_START_TIMEOUT:.0f} s")
                guest_cmd = [*pvbus, "guest", "--socket", sock, "--ram", str(ram_mib), *guest_args, "--", *argv]
                guest = await trio.run_process(guest_cmd, check=False, stdin=None if exec_mode else b"")
                return guest.returncode
            finally:
                host.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await host.wait()
                if host.returncode is None:
                    host.kill()
                    await host.wait()
                nursery.cancel_scope.cancel()


async def _ask_host(socket_path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One admin request to a running host; its problems as one line."""
    from vmbus.admin import admin_request

    try:
        answer = await admin_request(socket_path, request)
    except OSError as exc:
        raise CommandError(connect_problem(socket_path, exc)) from exc
    except ValueError as exc:  # no JSON: the host stopped while answering
        raise CommandError(f"the host on {socket_path} gave no answer ({describe(exc)})") from exc
    if not answer.get("ok", False):
        raise CommandError(f"the host refused: {answer.get('error', 'no reason given')}")
    return answer


async def inspect_main(socket_path: str) -> int:
    print(json.dumps(await _ask_host(socket_path, {"cmd": "inspect"}), indent=2))
    return 0


async def device_command_main(socket_path: str, partition: int, device: str, command: str,
                              args: dict[str, Any]) -> int:
    """``pvbus shutdown`` / ``pvbus kvp``: one command of one guest's device,
    through the host's admin socket; prints the device's answer as JSON."""
    answer = await _ask_host(socket_path, {"cmd": "device", "partition": partition, "device": device,
                                           "command": command, "args": args})
    answer.pop("ok", None)
    print(json.dumps(answer, indent=2))
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
