"""Built-in guest programs: ``pvbus guest --program NAME``.

A guest program is ``async def program(kernel, argv) -> int`` (the exit
status); ``--program module:function`` runs any such callable.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

Program = Callable[[Any, list[str]], Awaitable[int]]


async def echo_demo(kernel: Any, argv: list[str]) -> int:
    """Round-trip echo requests through the bus and report what it cost."""
    from hdrh.histogram import HdrHistogram

    count = int(argv[0]) if argv else 20_000
    echo = kernel.device("echo")
    hist = HdrHistogram(1, 10_000_000_000, 3)
    before = dict(kernel.hypercalls.exits)
    t0 = time.perf_counter()
    for i in range(count):
        data = i.to_bytes(8, "little") * 8
        s = time.perf_counter_ns()
        if await echo.echo(data) != data:
            print(f"echo {i} came back wrong", file=sys.stderr)
            return 1
        hist.record_value(max(1, time.perf_counter_ns() - s))
    dt = time.perf_counter() - t0
    exits = {k: v - before.get(k, 0) for k, v in kernel.hypercalls.exits.items() if v - before.get(k, 0)}
    total_exits = sum(exits.values())
    print(json.dumps({
        "program": "echo-demo", "requests": count, "seconds": round(dt, 3),
        "requests_per_s": round(count / dt), "rtt_p50_us": hist.get_value_at_percentile(50) / 1000,
        "rtt_p99_us": hist.get_value_at_percentile(99) / 1000, "exits": exits,
        "exits_per_request": round(total_exits / count, 4), "version": kernel.statistics()["version"],
    }))
    return 0


async def echo_load(kernel: Any, argv: list[str]) -> int:
    """Echo forever with several requests in flight (until killed or cancelled);
    prints one line per second with the count, so tests can watch progress."""
    echo = kernel.device("echo")
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        i = 0
        while True:
            data = f"{os.getpid()}-{k}-{i}".encode()
            if await echo.echo(data) != data:
                raise RuntimeError("echo mismatch")
            i += 1
            done += 1

    async with trio.open_nursery() as nursery:
        for k in range(int(argv[0]) if argv else 4):
            nursery.start_soon(worker, k)
        while True:
            await trio.sleep(0.2)
            print(json.dumps({"echoes": done}), flush=True)


async def idle(kernel: Any, argv: list[str]) -> int:
    """Boot, say so, and wait to be told to stop (stdin closes or SIGTERM)."""
    print(json.dumps({"booted": True, "pid": os.getpid(), **kernel.statistics()}), flush=True)
    await trio.sleep_forever()
    return 0


BUILTIN: dict[str, Program] = {"echo-demo": echo_demo, "echo-load": echo_load, "idle": idle}


def resolve(name: str) -> Program:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise SystemExit(f"unknown program {name!r}: built-ins are {', '.join(BUILTIN)}, or give module:function")
    module, func = name.split(":", 1)
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]
