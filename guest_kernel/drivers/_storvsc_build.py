"""cffi build script (API mode) for the storvsc's C fast path,
``guest_kernel.drivers._storvsc_c``: ``csrc/storvsc_fast.c`` on the ring core
and its queue layer, built by ``ring.build.device_module``.  Named in
``setup.py``'s ``cffi_modules``."""

from __future__ import annotations

from pathlib import Path

from ring.build import device_module

_HERE = Path(__file__).resolve().parent
ffibuilder = device_module("guest_kernel.drivers._storvsc_c", _HERE / "csrc", "storvsc_fast",
                           [_HERE.parents[1] / "vmbus" / "csrc" / "storvsc_wire.h"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
