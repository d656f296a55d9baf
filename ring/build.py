"""Building a device's C fast path on the ring core, and checking it at load.

A device with C per-packet code (a host handler for ``pv_serve``, a guest
builder and decoder for ``pv_stage`` / ``pv_reap``, see ``csrc/queue.h``)
ships a cffi build script that calls ``device_module`` and names it in its
``setup.py``'s ``cffi_modules``::

    from ring.build import device_module
    ffibuilder = device_module("mydev._mydev_c", Path(__file__).parent / "csrc", "mydev_fast")

The extension gets the ring core compiled in (``ring.c`` and the queue
layer ``queue.c``), so its C drives the very ``pv_ring`` handles the
Python rings own: a handle crosses extensions as an address
(``IncomingRing.c_address``).  That is only sound while both extensions
were built from the same headers, so the device's Python module calls
``check_device_module(ffi, lib, name)`` right after importing its
extension: it compares the ABI version constant and the sizes of the
shared structs with the ring's own build and refuses a stale one with a
clear ``ImportError`` instead of corrupting memory later.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cffi import FFI

from ._ring_build import CORE_HEADERS, CORE_SOURCES, RING_CSRC, c_module

__all__ = ["RING_CSRC", "SHARED_STRUCTS", "check_device_module", "device_module"]

# The structs a device extension and the ring extension exchange by address.
SHARED_STRUCTS = ("pv_ring", "pv_packet", "pv_server", "pv_echo_reply")


def device_module(name: str, csrc: Path, stem: str, wire_headers: Sequence[Path] = ()) -> FFI:
    """The cffi builder of a device's C extension ``name`` (a dotted module
    path): ``csrc/<stem>.c`` plus the ring core, with ``ring.h``,
    ``queue.h``, the ``wire_headers`` (shared packet layouts, included in
    order) and ``csrc/<stem>.h`` as the cdef.  Every header must be plain
    declarations (it is cffi's cdef and the C header at once)."""
    csrc = Path(csrc).resolve()
    wire = [Path(h).resolve() for h in wire_headers]
    return c_module(
        name,
        [*CORE_HEADERS, *wire, csrc / f"{stem}.h"],
        [*CORE_SOURCES, csrc / f"{stem}.c"],
        [RING_CSRC, *dict.fromkeys(h.parent for h in wire), csrc],
    )


def check_device_module(ffi: Any, lib: Any, name: str) -> None:
    """Raise ImportError unless extension ``name`` (its ``ffi`` and ``lib``)
    was built against the same ring ABI as ``ring._ring_c``."""
    from ._ring_c import ffi as ring_ffi
    from ._ring_c import lib as ring_lib

    theirs = getattr(lib, "PV_RING_ABI_VERSION", None)
    if theirs != ring_lib.PV_RING_ABI_VERSION:
        raise ImportError(f"{name} was built for ring ABI {theirs}, the ring is at "
                          f"{ring_lib.PV_RING_ABI_VERSION}: reinstall the package to rebuild it")
    for struct in SHARED_STRUCTS:
        if ffi.sizeof(struct) != ring_ffi.sizeof(struct):
            raise ImportError(f"{name}: {struct} is {ffi.sizeof(struct)} bytes there and "
                              f"{ring_ffi.sizeof(struct)} in the ring: reinstall the package to rebuild it")
