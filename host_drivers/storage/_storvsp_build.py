"""cffi build script (API mode) for the storvsp's C fast path,
``host_drivers.storage._storvsp_c``: ``csrc/storvsp_fast.c`` on the ring core
and its queue layer, built by ``ring.build.device_module``.  Named in
``setup.py``'s ``cffi_modules``."""

from __future__ import annotations

from pathlib import Path

from ring.build import device_module

_HERE = Path(__file__).resolve().parent
ffibuilder = device_module("host_drivers.storage._storvsp_c", _HERE / "csrc", "storvsp_fast",
                           [_HERE.parents[1] / "vmbus" / "csrc" / "storvsc_wire.h"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
