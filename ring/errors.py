"""What can go wrong on a ring, split by who did it.

``RingFull`` and ``RingEmpty`` are flow control, caught on hot paths, not
failures.  ``PacketTooLarge`` is our own caller's mistake that no amount of
waiting can fix.  ``RingCorrupt`` means the peer wrote something invalid
into shared memory: the ring is unusable from then on and the owner of the
channel should close it.
"""

from __future__ import annotations


class RingError(Exception):
    """Base of every ring error."""


class RingFull(RingError):
    """Not enough free space right now.

    ``needed`` is how many free bytes the ring must have for the refused
    packet (bytes staged but not yet committed included); pass it to
    ``OutgoingRing.arm_pending_send`` to be signalled when it is there.
    """

    def __init__(self, needed: int) -> None:
        super().__init__(f"ring full: {needed} free bytes needed")
        self.needed = needed


class RingEmpty(RingError):
    """Nothing to read."""


class PacketTooLarge(RingError, ValueError):
    """The packet can never fit in this ring, however long one waits."""

    def __init__(self, total: int, limit: int) -> None:
        super().__init__(f"packet of {total} bytes (with trailer) exceeds ring limit {limit}")
        self.total = total
        self.limit = limit


class RingCorrupt(RingError):
    """Peer gave us an invalid index, descriptor or length.

    ``reason`` is a short lower-case word (``index``, ``short``,
    ``offset8``, ``length``, ``type``, ``flags``) and ``value`` the offending
    number.  The ring stays corrupt: every later call raises again.
    """

    def __init__(self, reason: str, value: int) -> None:
        super().__init__(f"ring corrupt: bad {reason} ({value:#x})")
        self.reason = reason
        self.value = value


CORRUPT_REASONS = ("none", "index", "short", "offset8", "length", "type", "flags")
