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

Argument parsing is argparse (stdlib); output is rich.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__


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

    return trio.run(guest_main, args.socket, args.program, args.args, args.ram, args.versions)


def _cmd_run(args: argparse.Namespace) -> int:
    import trio

    from .launch import run_main, storage_demo

    if args.program is None:
        return storage_demo(args.disk, args.disk_size, args.writable)
    host_args = ["--disk", args.disk] if args.disk else []
    if args.disk_size:
        host_args += ["--disk-size", args.disk_size]
    if args.disk and os.path.lexists(args.disk) and not args.writable:
        host_args.append("--read-only")  # the user's existing disk: written only when they say so
    return trio.run(run_main, args.program, args.args, args.device, args.ram, host_args)


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

    return blockbench.main(args.json, args.quick)


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


def _disk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disk", help="disk image or block device for the storage device")
    parser.add_argument("--disk-size", help="create the image sparse at this size if missing (e.g. 1G)")
    parser.add_argument("--read-only", action="store_true", help="offer the disk read-only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvbus", description="Paravirtual I/O over VMBus-format rings.")
    parser.add_argument("--version", action="version", version=f"pvbus {__version__}")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning (default), error")
    sub = parser.add_subparsers(dest="command", required=True)

    host = sub.add_parser("host", help="run the host service in the foreground (SIGTERM stops it)")
    host.add_argument("--socket", required=True, help="AF_UNIX path guests connect to")
    host.add_argument("--device", action="append", help="offer this device (repeatable; default: all installed)")
    host.add_argument("--versions", help="VMBus versions to accept, e.g. 4.0,3.0 (default: 3.0 to 5.3)")
    _disk_arguments(host)
    host.add_argument("--emulated-disks", action="store_true",
                      help="also attach an emulated IDE (PIO) and DMA controller on the disk image")
    host.add_argument("--group", metavar="NAME",
                      help="share the guest and admin sockets with this group (mode 0660; default: owner only)")
    host.set_defaults(func=_cmd_host)

    guest = sub.add_parser("guest", help="boot a guest kernel against a host and run a guest program")
    guest.add_argument("--socket", required=True)
    guest.add_argument("--program", default="echo-demo", help="echo-demo, echo-load, idle, or module:function")
    guest.add_argument("--ram", type=int, default=256, help="guest RAM in MiB (default 256)")
    guest.add_argument("--versions", help="VMBus versions to offer, newest first (default 5.3 down to 3.0)")
    guest.add_argument("args", nargs="*", help="arguments for the guest program (after --)")
    guest.set_defaults(func=_cmd_guest)

    run = sub.add_parser("run", help="a host and a guest as a pair; default: the storage demo on a generated image")
    run.add_argument("--program", help="a guest program instead of the storage demo (echo-demo, module:function)")
    run.add_argument("--device", action="append")
    run.add_argument("--ram", type=int, default=256)
    run.add_argument("--disk", help="disk image or block device for the storage device: an existing one is used "
                                    "as it is, read-only unless --writable; a missing one is created at "
                                    "--disk-size (default: a temporary image, removed after)")
    run.add_argument("--disk-size", help="size of an image to create (default 128M for the demo); "
                                         "an existing image is never resized")
    run.add_argument("--writable", action="store_true",
                     help="let the guest (and the demo's write workloads) write to an existing --disk")
    run.add_argument("args", nargs="*")
    run.set_defaults(func=_cmd_run)

    inspect = sub.add_parser("inspect", help="a running host's partitions, channels, rings and counters (JSON)")
    inspect.add_argument("--socket", required=True)
    inspect.set_defaults(func=_cmd_inspect)

    demo = sub.add_parser("ring-demo", help="two processes moving packets over a bare ring pair")
    demo.add_argument("--packets", type=int, default=200_000, help="packets in the checked transfer")
    demo.set_defaults(func=_cmd_ring_demo)

    bench = sub.add_parser("bench", help="benchmarks; alone: the four kinds of virtualization side by side")
    bench.add_argument("--json", metavar="FILE", help="write the records as JSON")
    bench.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    bench.add_argument("--rw", action="append", choices=["read", "write", "randread", "randwrite"],
                       help="workload(s) instead of the default matrix (fio-like, repeatable)")
    bench.add_argument("--bs", default="4k", help="block size with --rw (default 4k)")
    bench.add_argument("--iodepth", type=int, default=1, help="queue depth with --rw (default 1)")
    bench.add_argument("--size", default="64M", help="region the workload covers (default 64M)")
    bench.add_argument("--runtime", type=float, default=1.0, help="measured seconds per workload and mode")
    bench.add_argument("--ramp", type=float, default=0.2, help="warm-up seconds before measuring")
    bench.set_defaults(func=_cmd_bench_kinds)
    bench_sub = bench.add_subparsers(dest="bench")
    ring = bench_sub.add_parser("ring", help="the ring against pipes and queues, two processes")
    ring.add_argument("--json", metavar="FILE", help="write the records as JSON")
    ring.add_argument("--quick", action="store_true", help="short runs (a smoke test, noisier)")
    ring.set_defaults(func=_cmd_bench_ring)
    block = bench_sub.add_parser("block", help="block workloads natively and through the paravirtual disk")
    block.add_argument("--json", metavar="FILE", help="write the records as JSON")
    block.add_argument("--quick", action="store_true", help="short runs (a smoke test, noisier)")
    block.set_defaults(func=_cmd_bench_block)
    report = bench_sub.add_parser("report", help="Markdown and PNG charts from a benchmark's JSON")
    report.add_argument("results", help="JSON written by pvbus bench --json")
    report.add_argument("--kinds-doc", metavar="FILE", help="also write the four-kinds document here")
    report.set_defaults(func=_cmd_bench_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
