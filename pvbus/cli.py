"""``pvbus``: the single entry point.

Subcommands:

- ``pvbus host`` / ``pvbus guest``: the two halves, one process each
  (``pvbus.launch``).
- ``pvbus run``: the main job on its embedded default: a host with a
  generated disk image and a guest running a short block workload, beside
  the same workload done natively; ``--program`` runs any guest program
  (``echo-demo``, ``module:function``) against a host instead.
- ``pvbus inspect``: a running host's partitions, channels and counters.
- ``pvbus ring-demo``: two processes moving a checked packet stream over a
  bare ring pair.
- ``pvbus bench [--json FILE] [--quick]``: one block workload four ways:
  native, paravirtual, fully virtualized (trapped DMA controller) and
  emulated (programmed I/O).
- ``pvbus bench block [--json FILE] [--quick]``: native vs paravirtual disk.
- ``pvbus bench ring [--json FILE] [--quick]``: the ring against
  ``os.pipe``, ``multiprocessing.Pipe`` and ``faster_fifo.Queue``.
- ``pvbus bench sockets [--json FILE] [--quick]``: a guest's stream and
  round trips through the sockets device beside loopback TCP.

Argument parsing is argparse (stdlib); output is rich.

A user sees one line per problem, never a traceback: options are checked
as they are parsed (sizes, RAM, versions), a command reports what it
cannot do as a ``CommandError``, and ``main`` turns anything else into
``pvbus: error: ...`` (exit status 1; exception groups from trio read as
the exceptions inside).  ``pvbus --debug`` shows the tracebacks instead.
Usage errors exit with 2, as argparse does; Ctrl-C with 130, quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from typing import NoReturn

from . import __version__
from .errors import CommandError, describe, leaves


def _logging(level: str) -> None:
    import logging

    from rich.logging import RichHandler

    handler: logging.Handler = RichHandler(show_path=False) if sys.stderr.isatty() else logging.StreamHandler()
    if not sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _cmd_host(args: argparse.Namespace) -> int:
    import trio

    from .launch import disk_config, host_main

    return trio.run(host_main, args.socket, args.device, args.versions,
                    disk_config(args.disk, args.disk_size, args.read_only), args.emulated_disks, args.group)


def _cmd_guest(args: argparse.Namespace) -> int:
    import trio

    from .launch import guest_main

    _check_exec(args)
    return trio.run(partial(guest_main, network={"netns": args.netns, "address": args.ip, "gateway": args.gateway}),
                    args.socket, args.program, args.args, args.ram, args.versions,
                    args.args if args.exec else None, args.mount)


def _cmd_run(args: argparse.Namespace) -> int:
    import trio

    from .launch import run_main, storage_demo

    _check_exec(args)
    if args.program is None and not args.exec:
        return storage_demo(args.disk, args.disk_size, args.writable)
    host_args = ["--disk", args.disk] if args.disk else []
    if args.disk_size:
        host_args += ["--disk-size", args.disk_size]
    if args.disk and os.path.lexists(args.disk) and not args.writable:
        host_args.append("--read-only")  # the user's existing disk: written only when they say so
    return trio.run(run_main, args.program, args.args, args.device, args.ram, host_args, _pvbus_options(args),
                    args.exec, args.mount)


def _cmd_bench_net(args: argparse.Namespace) -> int:
    from .bench import netbench

    return netbench.main(args.json, args.quick)


def _cmd_bench_sockets(args: argparse.Namespace) -> int:
    from .bench import sockbench

    return sockbench.main(args.json, args.quick)


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from .bench import report

    return report.main(args.results, args.kinds_doc)


def _cmd_bench_kinds(args: argparse.Namespace) -> int:
    from .bench import kinds
    from .bench.blockload import Workload
    from .launch import parse_size

    custom = None
    if args.rw:
        custom = [Workload(rw, parse_size(args.bs), args.iodepth, parse_size(args.size), args.runtime, args.ramp)
                  for rw in args.rw]
    return kinds.main(args.json, args.quick, custom)


def _cmd_bench_block(args: argparse.Namespace) -> int:
    from .bench import blockbench

    if args.fio:
        return blockbench.main_fio(args.json, args.quick)
    return blockbench.main(args.json, args.quick)


def _cmd_devices(args: argparse.Namespace) -> int:
    """Installed devices (paravirtual and trapped) and the options each takes."""
    from vmbus.config import describe_options
    from vmbus.device import load_devices
    from vmbus.trapped import load_trapped_devices

    for name, spec in sorted(load_devices().items()):
        print(f"{name}: {spec.description}")
        for line in describe_options(spec.config_schema):
            print(f"    {line}")
    for name, trapped in sorted(load_trapped_devices().items()):
        print(f"{name} (trapped, --emulated-disks): {trapped.description}")
    return 0


def _cmd_shutdown(args: argparse.Namespace) -> int:
    import trio

    from .launch import device_command_main

    return trio.run(device_command_main, args.socket, args.guest, "shutdown", "shutdown",
                    {"reboot": args.reboot, "force": args.force})


def _cmd_kvp(args: argparse.Namespace) -> int:
    import trio

    from .launch import device_command_main

    request: dict[str, str] = {}
    if args.pool:
        request["pool"] = args.pool
    if args.action != "list":
        request["key"] = args.key
    if args.action == "set":
        request["value"] = args.value
    return trio.run(device_command_main, args.socket, args.guest, "kvp", args.action, request)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import trio

    from .launch import inspect_main

    return trio.run(inspect_main, args.socket)


def _cmd_ring_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .bench import workload
    from .bench.ringpair import RingPair, checked_crc
    from .bench.runner import run_roles

    console = Console()
    table = Table(title="pvbus ring demo: two processes, one memfd, VMBus rings, eventfd doorbells")
    for col in ("transfer", "packets", "MB", "s", "pkts/s", "MB/s", "signals", "check"):
        table.add_column(col, justify="left" if col in ("transfer", "check") else "right")

    count, seed = args.packets, 7
    pair = RingPair()
    try:
        t0 = time.perf_counter()
        prod, cons = run_roles(pair, [("produce_checked", {"count": count, "seed": seed}),
                                      ("consume_checked", {"count": count, "seed": seed})])
        dt = time.perf_counter() - t0
    finally:
        pair.close()
    from .bench.ringpair import mixed_sizes

    nbytes = sum(mixed_sizes(count, seed))
    ok = cons["received"] == count and cons["bad"] == 0 and cons["crc"] == checked_crc(count, seed)
    table.add_row("mixed sizes, checked", f"{count:,}", f"{nbytes / 1e6:,.0f}", f"{dt:.2f}",
                  f"{count / dt:,.0f}", f"{nbytes / dt / 1e6:,.0f}", f"{prod['signals'] + cons['signals']:,}",
                  "ok" if ok else f"FAILED ({cons['bad']} bad)")

    burst = args.packets * 10
    pair = RingPair()
    try:
        prod, cons = run_roles(pair, [("produce", {"count": burst, "size": 64, "batch": 512}),
                                      ("consume", {"count": burst, "size": 64, "batch": 512})])
    finally:
        pair.close()
    dt = cons["t_end"] - prod["t_start"]
    ok2 = cons["received"] == burst and cons["crc"] == workload.expected_crc(burst, 64)
    table.add_row("64 B, batched", f"{burst:,}", f"{burst * 64 / 1e6:,.0f}", f"{dt:.2f}", f"{burst / dt:,.0f}",
                  f"{burst * 64 / dt / 1e6:,.0f}", f"{prod['signals'] + cons['signals']:,}",
                  "ok" if ok2 else "FAILED")
    console.print(table)
    return 0 if ok and ok2 else 1


def _cmd_bench_ring(args: argparse.Namespace) -> int:
    from .bench import ringbench

    return ringbench.main(args.json, args.quick)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in one line, naming where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _checked(check_name: str, convert: type = str) -> argparse._ActionType:
    """An argparse type: ``convert`` the text, then pass it to the checker
    ``check_name`` of ``pvbus.launch`` (imported only when the option is
    given), whose ValueError becomes argparse's one-line message."""

    def check(text: str) -> object:
        from . import launch

        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        try:
            getattr(launch, check_name)(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    check.__name__ = check_name
    return check


_size = _checked("parse_size")
_versions = _checked("parse_versions")
_ram = _checked("check_ram", int)


def _at_least(least: float, convert: type = int) -> argparse._ActionType:
    """An argparse type for a number of at least ``least``."""
    kind = "a whole number" if convert is int else "a number"

    def number(text: str) -> object:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not value >= least:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind} of at least {least:g}")
        return value

    number.__name__ = "number"
    return number


def _pvbus_options(args: argparse.Namespace) -> list[str]:
    """The global options, for the processes a command starts."""
    return ["--log-level", args.log_level, *(["--debug"] if args.debug else [])]


def _disk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disk", help="disk image or block device for the storage device")
    parser.add_argument("--disk-size", type=_size, help="create the image sparse at this size if missing (e.g. 1G)")
    parser.add_argument("--read-only", action="store_true", help="offer the disk read-only")


def _check_exec(args: argparse.Namespace) -> None:
    from .errors import UsageError

    if args.mount and not args.exec:
        raise UsageError("--mount is for --exec (a real program in the guest): add --exec -- CMD")


def _exec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exec", action="store_true",
                        help="run a real program in the guest instead: the command after -- (e.g. --exec -- sh -c "
                             "'mkfs.ext4 -q /dev/pvbus/disk0'), in the guest's own namespaces, each disk a file "
                             "/dev/pvbus/diskN; the guest exits with its status (needs root, FUSE, loop devices)")
    parser.add_argument("--mount", action="append", default=[], metavar="DISK:DIR[:TYPE]",
                        help="with --exec: mount a disk in the guest before the command runs, through a loop device "
                             "(e.g. disk0:/mnt:ext4; repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pvbus", description="Paravirtual I/O over VMBus-format rings.")
    parser.add_argument("--version", action="version", version=f"pvbus {__version__}")
    parser.add_argument("--log-level", default="warning", type=str.lower, choices=["debug", "info", "warning", "error"],
                        help="debug, info, warning (default), error")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to run")

    host = sub.add_parser("host", help="run the host service in the foreground (SIGTERM stops it)")
    host.add_argument("--socket", required=True, help="AF_UNIX path guests connect to")
    host.add_argument("--device", action="append", metavar="NAME[:KEY=VALUE,...]",
                      help="offer this device, with its options (repeatable; default: all installed; "
                           "`pvbus devices` lists them and their options)")
    host.add_argument("--versions", type=_versions,
                      help="VMBus versions to accept, e.g. 4.0,3.0 (default: 3.0 to 5.3)")
    _disk_arguments(host)
    host.add_argument("--emulated-disks", action="store_true",
                      help="also attach an emulated IDE (PIO) and DMA controller on the disk image")
    host.add_argument("--group", metavar="NAME",
                      help="share the guest and admin sockets with this group (mode 0660; default: owner only)")
    host.set_defaults(func=_cmd_host)

    guest = sub.add_parser("guest", help="boot a guest kernel against a host and run a guest program")
    guest.add_argument("--socket", required=True, help="AF_UNIX path of the host to connect to")
    guest.add_argument("--program", default="echo-demo",
                       help="echo-demo, echo-load, idle, or module:function (imported from the current directory)")
    guest.add_argument("--ram", type=_ram, default=256, help="guest RAM in MiB (default 256)")
    guest.add_argument("--versions", type=_versions,
                       help="VMBus versions to offer, newest first (default 5.3 down to 3.0)")
    guest.add_argument("--ip", metavar="ADDR/PREFIX", type=_checked("check_address"),
                       help="with a net device: the address of the guest's eth0 (e.g. 10.0.0.2/24)")
    guest.add_argument("--gateway", metavar="ADDR", help="with a net device: the guest's default route")
    guest.add_argument("--netns", metavar="NAME",
                       help="with a net device: the named network namespace eth0 goes in (default "
                            "pvbus-guest-<pid>, created and removed by the guest)")
    guest.add_argument("args", nargs="*", help="arguments for the guest program (after --)")
    _exec_arguments(guest)
    guest.set_defaults(func=_cmd_guest)

    run = sub.add_parser("run", help="a host and a guest as a pair; default: the storage demo on a generated image")
    run.add_argument("--program", help="a guest program instead of the storage demo (echo-demo, module:function)")
    run.add_argument("--device", action="append", metavar="NAME[:KEY=VALUE,...]",
                     help="with --program: offer only this device, with its options (repeatable; "
                          "default: all installed)")
    run.add_argument("--ram", type=_ram, default=256, help="with --program: guest RAM in MiB (default 256)")
    run.add_argument("--disk", help="disk image or block device for the storage device: an existing one is used "
                                    "as it is, read-only unless --writable; a missing one is created at "
                                    "--disk-size (default: a temporary image, removed after)")
    run.add_argument("--disk-size", help="size of an image to create (default 128M for the demo); "
                                         "an existing image is never resized")
    run.add_argument("--writable", action="store_true",
                     help="let the guest (and the demo's write workloads) write to an existing --disk")
    run.add_argument("args", nargs="*", help="arguments for the guest program (after --)")
    _exec_arguments(run)
    run.set_defaults(func=_cmd_run)

    devices = sub.add_parser("devices", help="installed devices and the options each takes (--device NAME:KEY=VALUE)")
    devices.set_defaults(func=_cmd_devices)

    inspect = sub.add_parser("inspect", help="a running host's partitions, channels, rings and counters (JSON)")
    inspect.add_argument("--socket", required=True, help="AF_UNIX path the host listens on")
    inspect.set_defaults(func=_cmd_inspect)

    shutdown = sub.add_parser("shutdown", help="ask a running guest to shut down cleanly (shutdown service)")
    shutdown.add_argument("--socket", required=True, help="AF_UNIX path the host listens on")
    shutdown.add_argument("guest", type=_at_least(1), help="the guest's partition id (pvbus inspect shows it)")
    shutdown.add_argument("--reboot", action="store_true", help="ask for a reboot instead of a power-off")
    shutdown.add_argument("--force", action="store_true", help="ask the guest not to wait for its programs")
    shutdown.set_defaults(func=_cmd_shutdown)

    kvp = sub.add_parser("kvp", help="read and write a running guest's key/value pools (KVP service)")
    kvp.add_argument("--socket", required=True, help="AF_UNIX path the host listens on")
    kvp.add_argument("--pool", help="pool: guest, external, auto, auto_external, auto_internal "
                                    "(default: guest to read, external to write)")
    kvp.add_argument("guest", type=_at_least(1), help="the guest's partition id (pvbus inspect shows it)")
    actions = kvp.add_subparsers(dest="action", required=True, metavar="get|set|delete|list",
                                 help="what to do with the pool")
    get = actions.add_parser("get", help="one key's value")
    get.add_argument("key", help="the key")
    put = actions.add_parser("set", help="set a key (the guest program can read it)")
    put.add_argument("key", help="the key")
    put.add_argument("value", help="the value")
    delete = actions.add_parser("delete", help="delete a key")
    delete.add_argument("key", help="the key")
    actions.add_parser("list", help="every key and value of the pool")
    kvp.set_defaults(func=_cmd_kvp)

    demo = sub.add_parser("ring-demo", help="two processes moving packets over a bare ring pair")
    demo.add_argument("--packets", type=_at_least(1), default=200_000, help="packets in the checked transfer")
    demo.set_defaults(func=_cmd_ring_demo)

    bench = sub.add_parser("bench", help="benchmarks; alone: the four kinds of virtualization side by side")
    bench.add_argument("--json", metavar="FILE", help="write the records as JSON")
    bench.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    bench.add_argument("--rw", action="append", choices=["read", "write", "randread", "randwrite"],
                       help="workload(s) instead of the default matrix (fio-like, repeatable)")
    bench.add_argument("--bs", default="4k", type=_size, help="block size with --rw (default 4k)")
    bench.add_argument("--iodepth", type=_at_least(1), default=1, help="queue depth with --rw (default 1)")
    bench.add_argument("--size", default="64M", type=_size, help="region the workload covers (default 64M)")
    bench.add_argument("--runtime", type=_at_least(0.01, float), default=1.0,
                       help="measured seconds per workload and mode")
    bench.add_argument("--ramp", type=_at_least(0, float), default=0.2, help="warm-up seconds before measuring")
    bench.set_defaults(func=_cmd_bench_kinds)
    bench_sub = bench.add_subparsers(dest="bench", metavar="KIND", help="one benchmark instead of the four kinds")
    ring = bench_sub.add_parser("ring", help="the ring against pipes and queues, two processes")
    ring.add_argument("--json", metavar="FILE", help="write the records as JSON")
    ring.add_argument("--quick", action="store_true", help="short runs (a smoke test, noisier)")
    ring.set_defaults(func=_cmd_bench_ring)
    block = bench_sub.add_parser("block", help="block workloads natively and through the paravirtual disk")
    block.add_argument("--json", metavar="FILE", help="write the records as JSON")
    block.add_argument("--quick", action="store_true", help="short runs (a smoke test, noisier)")
    block.add_argument("--fio", action="store_true",
                       help="fio (the real tool) inside a guest on /dev/pvbus/disk0 beside fio natively "
                            "(needs root, FUSE and fio)")
    block.set_defaults(func=_cmd_bench_block)
    net = bench_sub.add_parser("net", help="TCP stream and request/response through the pvbus NIC and a veth pair")
    net.add_argument("--json", metavar="FILE", help="write the records as JSON")
    net.add_argument("--quick", action="store_true", help="short runs (a smoke test, noisier)")
    net.set_defaults(func=_cmd_bench_net)
    sockets = bench_sub.add_parser("sockets", help="stream and request/response through the sockets device "
                                   "and loopback TCP")
    sockets.add_argument("--json", metavar="FILE", help="write the records as JSON")
    sockets.add_argument("--quick", action="store_true", help="short runs (a smoke test, noisier)")
    sockets.set_defaults(func=_cmd_bench_sockets)
    report = bench_sub.add_parser("report", help="Markdown and PNG charts from a benchmark's JSON")
    report.add_argument("results", help="JSON written by pvbus bench --json")
    report.add_argument("--kinds-doc", metavar="FILE", help="also write the four-kinds document here")
    report.set_defaults(func=_cmd_bench_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Our reader went away (``pvbus devices | head``): stop quietly, as
        # a filter does, and keep the interpreter from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except BaseException as exc:  # noqa: BLE001 - the one place every error becomes a line
        if args.debug or isinstance(exc, SystemExit):
            raise
        return _report(exc, f"pvbus {args.command}")


def _report(exc: BaseException, prog: str) -> int:
    """Print ``exc`` as one line on stderr; return the exit status."""
    found = leaves(exc)
    if any(isinstance(e, KeyboardInterrupt) for e in found):
        return 130
    known = next((e for e in found if isinstance(e, CommandError)), None)
    if known is not None:
        error = "error: " if known.exit_status == 2 else ""
        print(f"{prog}: {error}{known}", file=sys.stderr)
        return known.exit_status
    leaf = next((e for e in found if not isinstance(e, SystemExit)), found[0])
    if isinstance(leaf, SystemExit):
        if not isinstance(leaf.code, int) and leaf.code is not None:
            print(f"{prog}: {leaf.code}", file=sys.stderr)
            return 1
        return leaf.code or 0
    print(f"pvbus: error: {describe(leaf)} (run with --debug for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
