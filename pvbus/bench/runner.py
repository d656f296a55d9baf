"""Run two roles of a transport in two forked processes and collect results.

Both children meet at a barrier before they start, so the producer's start
time and the consumer's end time (``time.perf_counter``, CLOCK_MONOTONIC,
the same clock in every process) bracket the transfer.  A child that
raises sends its traceback back and the run fails with it; a child that
hangs is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from typing import Any

_ctx = multiprocessing.get_context("fork")


class ChildFailed(RuntimeError):
    pass


def _child(
    transport: Any, side: int, role: str, kwargs: dict[str, Any], barrier: Any, conn: Any, cpus: set[int] | None
) -> None:
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        endpoint = transport.endpoint(side)
        barrier.wait(timeout=30)
        conn.send(("ok", getattr(endpoint, role)(**kwargs)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_roles(
    transport: Any,
    roles: list[tuple[str, dict[str, Any]]],
    timeout: float = 120.0,
    cpus: set[int] | None = None,
) -> list[dict[str, Any]]:
    """Run ``roles[i]`` on side ``i`` of ``transport``, each in its own
    process (pinned to ``cpus`` if given); returns their results in order."""
    barrier = _ctx.Barrier(len(roles))
    procs, conns = [], []
    for side, (role, kwargs) in enumerate(roles):
        recv, send = _ctx.Pipe(duplex=False)
        proc = _ctx.Process(target=_child, args=(transport, side, role, kwargs, barrier, send, cpus), daemon=True)
        proc.start()
        send.close()
        procs.append(proc)
        conns.append(recv)
    results: list[dict[str, Any]] = []
    try:
        for proc, conn in zip(procs, conns, strict=True):
            if not conn.poll(timeout):
                raise ChildFailed(f"{proc.name} did not finish within {timeout} s")
            status, value = conn.recv()
            if status != "ok":
                raise ChildFailed(value)
            results.append(value)
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results
