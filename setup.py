"""pvbus: paravirtual I/O over VMBus-format shared-memory rings.

Packaging metadata lives in pyproject.toml; this file exists for the one
thing it cannot express: the cffi C modules (the ring core and the device
fast paths), compiled at install time.
"""

from setuptools import setup

setup(
    cffi_modules=[
        "ring/_ring_build.py:ffibuilder",
        "host_drivers/storage/_storvsp_build.py:ffibuilder",
        "guest_kernel/drivers/_storvsc_build.py:ffibuilder",
    ],
)
