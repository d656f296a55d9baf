"""VMBus-format shared-memory rings with a C hot path.

What this package knows: bytes, indices, ordering and when to signal.  It
knows nothing of VMBus messages, channels or trio tasks (the doorbell is
the one trio-aware piece, and it only waits on an fd).

Key types:

- ``OutgoingRing`` / ``IncomingRing``: the producer and consumer sides of
  one ring, over any writable buffer (an mmap of a memfd, a bytearray) at
  any 8-aligned offset.  Staging is separate from publishing; ``commit``
  returns whether the peer must be signalled and never signals itself.
- ``PyOutgoingRing`` / ``PyIncomingRing``: the pure-Python reference with
  the same API, used by the tests to cross-check the C core.
- ``Doorbell``: an eventfd awaitable in trio.  ``SharedMemory``: a sealed
  memfd mapping whose fd can be passed to the peer.

Layout and rules: ``csrc/ring.h`` and the top of ``csrc/ring.c``.

Imports are lazy (PEP 562): ``import ring.build`` must work inside a
package build, before the C core exists and without the runtime
dependencies, so importing the package itself loads nothing; each name
below is imported from its module the first time it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> (module, attribute): what ``from ring import name`` gives.
_EXPORTS: dict[str, tuple[str, str]] = {
    "GpaRange": ("._api", "GpaRange"),
    "Packet": ("._api", "Packet"),
    "PacketInfo": ("._api", "PacketInfo"),
    "ReadBatch": ("._api", "ReadBatch"),
    "RingStatistics": ("._api", "RingStatistics"),
    "encode_gpa_direct_header": ("._api", "encode_gpa_direct_header"),
    "IncomingRing": ("._cring", "IncomingRing"),
    "OutgoingRing": ("._cring", "OutgoingRing"),
    "CONTROL_SIZE": ("._layout", "CONTROL_SIZE"),
    "DESCRIPTOR_SIZE": ("._layout", "DESCRIPTOR_SIZE"),
    "PAGE_SIZE": ("._layout", "PAGE_SIZE"),
    "TRAILER_SIZE": ("._layout", "TRAILER_SIZE"),
    "PacketType": ("._layout", "PacketType"),
    "pad8": ("._layout", "pad8"),
    "ring_total_size": ("._layout", "ring_total_size"),
    "PyIncomingRing": ("._pyring", "IncomingRing"),
    "PyOutgoingRing": ("._pyring", "OutgoingRing"),
    "SharedWords": (".atomics", "SharedWords"),
    "Doorbell": (".doorbell", "Doorbell"),
    "PacketTooLarge": (".errors", "PacketTooLarge"),
    "RingCorrupt": (".errors", "RingCorrupt"),
    "RingEmpty": (".errors", "RingEmpty"),
    "RingError": (".errors", "RingError"),
    "RingFull": (".errors", "RingFull"),
    "SharedMemory": (".shm", "SharedMemory"),
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers (a test keeps the two lists equal)
    from ._api import GpaRange as GpaRange
    from ._api import Packet as Packet
    from ._api import PacketInfo as PacketInfo
    from ._api import ReadBatch as ReadBatch
    from ._api import RingStatistics as RingStatistics
    from ._api import encode_gpa_direct_header as encode_gpa_direct_header
    from ._cring import IncomingRing as IncomingRing
    from ._cring import OutgoingRing as OutgoingRing
    from ._layout import CONTROL_SIZE as CONTROL_SIZE
    from ._layout import DESCRIPTOR_SIZE as DESCRIPTOR_SIZE
    from ._layout import PAGE_SIZE as PAGE_SIZE
    from ._layout import TRAILER_SIZE as TRAILER_SIZE
    from ._layout import PacketType as PacketType
    from ._layout import pad8 as pad8
    from ._layout import ring_total_size as ring_total_size
    from ._pyring import IncomingRing as PyIncomingRing
    from ._pyring import OutgoingRing as PyOutgoingRing
    from .atomics import SharedWords as SharedWords
    from .doorbell import Doorbell as Doorbell
    from .errors import PacketTooLarge as PacketTooLarge
    from .errors import RingCorrupt as RingCorrupt
    from .errors import RingEmpty as RingEmpty
    from .errors import RingError as RingError
    from .errors import RingFull as RingFull
    from .shm import SharedMemory as SharedMemory


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'ring' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
