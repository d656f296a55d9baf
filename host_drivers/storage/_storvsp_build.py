"""cffi build script (API mode) for the storvsp's C fast path,
``host_drivers.storage._storvsp_c``: ``csrc/storvsp_fast.c`` plus the ring
core it drives.  Named in ``setup.py``'s ``cffi_modules``."""

from __future__ import annotations

import runpy
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent
_build = runpy.run_path(str(_ROOT / "ring" / "_ring_build.py"))
_RING, _VMBUS, _CSRC = _build["RING_CSRC"], _ROOT / "vmbus" / "csrc", _HERE / "csrc"

ffibuilder = _build["c_module"](
    "host_drivers.storage._storvsp_c",
    [_RING / "ring.h", _VMBUS / "storvsc_wire.h", _CSRC / "storvsp_fast.h"],
    [_RING / "ring.c", _CSRC / "storvsp_fast.c"],
    [_RING, _VMBUS, _CSRC],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
