"""pvbus: paravirtual I/O over VMBus-format shared-memory rings.

Packaging metadata lives in pyproject.toml; this file exists for the one
thing it cannot express: the cffi C modules (the ring core and the device
fast paths), compiled at install time.  The device build scripts use the
public builder ``ring.build.device_module``, so the source tree goes on the
path first (a PEP 517 build does not put it there; ``ring`` imports nothing
heavy until a name is used).
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))

setup(
    cffi_modules=[
        "ring/_ring_build.py:ffibuilder",
        "host_drivers/storage/_storvsp_build.py:ffibuilder",
        "guest_kernel/drivers/_storvsc_build.py:ffibuilder",
    ],
)
