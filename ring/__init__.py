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
"""

from __future__ import annotations

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

__all__ = [
    "CONTROL_SIZE", "DESCRIPTOR_SIZE", "PAGE_SIZE", "TRAILER_SIZE", "Doorbell", "GpaRange", "IncomingRing",
    "OutgoingRing", "Packet", "PacketInfo",
    "PacketTooLarge", "PacketType", "PyIncomingRing", "PyOutgoingRing", "ReadBatch", "RingCorrupt", "RingEmpty",
    "RingError", "RingFull", "RingStatistics", "SharedMemory", "SharedWords", "encode_gpa_direct_header", "pad8",
    "ring_total_size",
]
