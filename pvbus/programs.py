"""Built-in guest programs: ``pvbus guest --program NAME``.

A guest program is ``async def program(kernel, argv) -> int`` (the exit
status); ``--program module:function`` runs any such callable, imported
with the current directory first on the module path (as ``python -m``
does, so ``pvbus guest`` and ``pvbus run`` find the same modules).
``resolve`` refuses, with a ``UsageError`` naming the fix, a module or
function that is not there or a function that is not ``async``; a
program refuses bad arguments the same way (``count_argument``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .errors import CommandError, UsageError, describe

Program = Callable[[Any, list[str]], Awaitable[int]]


async def echo_demo(kernel: Any, argv: list[str]) -> int:
    """Round-trip echo requests through the bus and report what it cost."""
    from hdrh.histogram import HdrHistogram

    count = count_argument("echo-demo", argv, "the number of requests", default=20_000)
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
    workers = count_argument("echo-load", argv, "the number of requests in flight", default=4)
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
        for k in range(workers):
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


def count_argument(program: str, argv: list[str], meaning: str, *, default: int) -> int:
    """A program's one optional argument, a positive whole number."""
    if not argv:
        return default
    if len(argv) > 1 or not argv[0].isdigit() or int(argv[0]) < 1:
        raise UsageError(f"{program} takes one argument, {meaning}, a whole number of at least 1 "
                         f"(got {' '.join(argv)!r}); e.g. -- {default}")
    return int(argv[0])


def resolve(name: str) -> Program:
    """The program ``name`` names: a built-in or ``module:function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, _, func_name = name.partition(":")
    if not module_name or not func_name:
        raise UsageError(f"unknown program {name!r}: the built-ins are {', '.join(BUILTIN)}; "
                         "or give module:function")
    module = _import(module_name)
    func = getattr(module, func_name, None)
    if func is None:
        found = sorted(n for n, v in vars(module).items() if not n.startswith("_") and inspect.iscoroutinefunction(v))
        there = f"its async functions: {', '.join(found)}" if found else "it defines no async function"
        raise UsageError(f"module {module_name} has no {func_name!r} ({there})")
    if not (inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)):
        raise UsageError(f"{name} is not an async function: a guest program is "
                         "'async def program(kernel, argv) -> int'")
    return func  # type: ignore[no-any-return]


def _import(module_name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):  # the program's own module
            raise UsageError(f"no module named {exc.name!r} in {os.getcwd()} or on the module path "
                             "(run from the directory that holds it, or set PYTHONPATH)") from exc
        raise CommandError(f"module {module_name} failed to import: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module: say how it failed, in one line
        raise CommandError(f"module {module_name} failed to import: {describe(exc)}") from exc
