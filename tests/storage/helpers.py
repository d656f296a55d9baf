"""A guest kernel in the test process talking to a real host process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from guest_kernel.kernel import GuestKernel
from vmbus.device import load_devices


@asynccontextmanager
async def booted(socket_path: str, ram_mib: int = 128) -> AsyncIterator[GuestKernel]:
    kernel = GuestKernel(load_devices(), ram_size=ram_mib << 20)
    try:
        async with trio.open_nursery() as nursery:
            await kernel.boot(socket_path, nursery)
            yield kernel
            await kernel.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        kernel.close()


def run_guest(socket_path: str, body: Callable[[Any], Any], ram_mib: int = 128) -> Any:
    async def main() -> Any:
        async with booted(socket_path, ram_mib) as kernel:
            return await body(kernel)

    return trio.run(main)
