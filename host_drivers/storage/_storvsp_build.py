"""cffi build script (API mode) for the storvsp's C fast path,
``host_drivers.storage._storvsp_c``: ``csrc/storvsp_fast.c`` plus the ring core it drives.  Named in
``setup.py``'s ``cffi_modules``."""

from __future__ import annotations

import runpy
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
_build = runpy.run_path(str(_ROOT / "ring" / "_ring_build.py"))
ffibuilder = _build["device_module"](
    "host_drivers.storage._storvsp_c", __file__, "storvsp_fast", [_ROOT / "vmbus" / "csrc" / "storvsc_wire.h"]
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
