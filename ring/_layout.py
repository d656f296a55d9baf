"""The VMBus ring format as Python constants: one place, checked against C.

Every number here is also in ``csrc/ring.h``; ``tests/ring/test_layout.py``
pins the two against each other and against the published layout
(torvalds/linux include/linux/hyperv.h ``struct hv_ring_buffer`` and
``struct vmpacket_descriptor``).  The pure-Python reference ring reads its
offsets from here.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

PAGE_SIZE: Final = 4096
CONTROL_SIZE: Final = 4096  # the control page in front of the data area

# Control page word offsets.
WRITE_INDEX_OFFSET: Final = 0
READ_INDEX_OFFSET: Final = 4
INTERRUPT_MASK_OFFSET: Final = 8
PENDING_SEND_SZ_OFFSET: Final = 12
FEATURE_BITS_OFFSET: Final = 64
FEAT_PENDING_SEND_SZ: Final = 1

DESCRIPTOR_SIZE: Final = 16
TRAILER_SIZE: Final = 8
MAX_LEN8: Final = 0xFFFF
FLAG_COMPLETION_REQUESTED: Final = 1

# type, offset8, len8, flags, trans_id
DESCRIPTOR: Final = struct.Struct("<HHHHQ")
# GPA-direct header after the descriptor: reserved, range count
GPA_DIRECT_HEADER: Final = struct.Struct("<II")
# one gpa_range head: byte_count, byte_offset (PFNs follow as u64)
GPA_RANGE_HEAD: Final = struct.Struct("<II")


class PacketType(IntEnum):
    """The packet types a ring accepts (openvmm's parser takes these four)."""

    DATA_INBAND = 0x6
    DATA_USING_XFER_PAGES = 0x7
    DATA_USING_GPA_DIRECT = 0x9
    COMPLETION = 0xB


KNOWN_TYPES: Final = frozenset(int(t) for t in PacketType)


def ring_total_size(data_size: int) -> int:
    """Bytes one ring occupies: control page plus data area."""
    return CONTROL_SIZE + data_size


def pad8(n: int) -> int:
    return (n + 7) & ~7
