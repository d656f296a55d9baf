"""``pvbus``: the single entry point.

Subcommands grow with the project.  Today:

- ``pvbus run``: the main job on its embedded default.  Until the bus
  exists it is a two-process ring demo: two processes share a memfd with
  a pair of VMBus rings and eventfd doorbells, move a checked stream of
  mixed-size packets and a 64-byte burst, and print what they moved and
  how fast.
- ``pvbus bench ring [--json FILE] [--quick]``: the ring against
  ``os.pipe``, ``multiprocessing.Pipe`` and ``faster_fifo.Queue``.

Argument parsing is argparse (stdlib); output is rich.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__


def _cmd_run(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvbus", description="Paravirtual I/O over VMBus-format rings.")
    parser.add_argument("--version", action="version", version=f"pvbus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job on its embedded default (today: the two-process ring demo)")
    run.add_argument("--packets", type=int, default=200_000, help="packets in the checked transfer")
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    ring = bench_sub.add_parser("ring", help="the ring against pipes and queues, two processes")
    ring.add_argument("--json", metavar="FILE", help="write the records as JSON")
    ring.add_argument("--quick", action="store_true", help="short runs (a smoke test, noisier)")
    ring.set_defaults(func=_cmd_bench_ring)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
