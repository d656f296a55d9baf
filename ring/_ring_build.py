"""cffi build script for the ring's C core (API mode), and the helper every
C module of the project is built with.

`setup.py` names this file in ``cffi_modules``; the C is compiled when the
package is installed and lands as ``ring._ring_c``.  ``csrc/ring.h`` is both
the cdef and the C header, so the layout cannot drift between the two; the
compiler, not cffi, decides every struct layout and constant value.

Device fast paths are built through ``ring.build.device_module`` (the
public face of ``c_module``): each compiles the ring core (``ring.c`` and
the queue layer ``queue.c``) into its own extension, so its C drives the
very ``pv_ring`` handles the Python rings own (a handle crosses modules as
an address; the struct comes from the same header, and
``ring.check_device_module`` compares the two builds at import).
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
RING_CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
# PVBUS_SANITIZE=1 builds every C module with AddressSanitizer and UBSan
# (``make sanitize`` does, in a copy of the tree; such modules load only with
# libasan preloaded).  Unset, the flags are the normal ones.
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
SANITIZING = os.environ.get("PVBUS_SANITIZE", "") not in ("", "0")


def c_module(name: str, headers: list[Path], sources: list[Path], include_dirs: list[Path]) -> FFI:
    """An API-mode builder for ``name``: ``headers`` are the cdef and are
    included in that order (each is plain declarations); ``sources`` are
    compiled in."""
    builder = FFI()
    builder.cdef("\n".join(h.read_text() for h in headers))
    builder.set_source(
        name,
        "#include <stdint.h>\n#include <stddef.h>\n" + "".join(f'#include "{h.name}"\n' for h in headers),
        sources=[str(c.relative_to(ROOT)) for c in sources],
        include_dirs=[str(d.relative_to(ROOT)) for d in include_dirs],
        extra_compile_args=CFLAGS + SANITIZE if SANITIZING else CFLAGS,
        extra_link_args=SANITIZE[:1] if SANITIZING else [],
    )
    return builder


# The ring core every C module carries: the ring and the queue layer over it.
CORE_HEADERS = [RING_CSRC / "ring.h", RING_CSRC / "queue.h"]
CORE_SOURCES = [RING_CSRC / "ring.c", RING_CSRC / "queue.c"]

ffibuilder = c_module(
    "ring._ring_c",
    [*CORE_HEADERS, RING_CSRC / "shmops.h"],
    [*CORE_SOURCES, RING_CSRC / "shmops.c"],
    [RING_CSRC],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
