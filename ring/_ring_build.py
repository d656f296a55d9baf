"""cffi build script for the ring's C core (API mode).

`setup.py` names this file in ``cffi_modules``; the C is compiled when the
package is installed and lands as ``ring._ring_c``.  ``csrc/ring.h`` is both
the cdef and the C header, so the layout cannot drift between the two; the
compiler, not cffi, decides every struct layout and constant value.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).resolve().parent
_CSRC = _HERE / "csrc"

ffibuilder = FFI()
_HEADERS = ("ring.h", "shmops.h")
_SOURCES = ("ring.c", "shmops.c")

ffibuilder.cdef("\n".join((_CSRC / h).read_text() for h in _HEADERS))
ffibuilder.set_source(
    "ring._ring_c",
    "#include <stdint.h>\n#include <stddef.h>\n" + "".join(f'#include "{h}"\n' for h in _HEADERS),
    sources=[str((_CSRC / c).relative_to(_HERE.parent)) for c in _SOURCES],
    include_dirs=[str(_CSRC.relative_to(_HERE.parent))],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
