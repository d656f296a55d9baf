"""The echo device's protocol: the smallest complete request/completion pair.

A request is an in-band packet with completion requested whose payload is
``u32 length`` + that many bytes.  The completion (type 0xB, same
transaction id) carries ``u32 status`` + the same bytes.  Status 0 is
success; ``STATUS_TOO_LONG`` answers a length beyond ``MAX_ECHO`` or
beyond the bytes actually present.
"""

from __future__ import annotations

import struct
import uuid
from typing import Final

INTERFACE_ID: Final = uuid.UUID("3b6d1b6a-6a9e-4c52-9d49-0c1a5e5c0e01")
MAX_ECHO: Final = 3072
LENGTH: Final = struct.Struct("<I")
STATUS_OK: Final = 0
STATUS_TOO_LONG: Final = 1


def request(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


def parse_request(payload: bytes) -> tuple[int, bytes]:
    """(status, data) for a request payload from an untrusted guest."""
    if len(payload) < LENGTH.size:
        return STATUS_TOO_LONG, b""
    (n,) = LENGTH.unpack_from(payload)
    if n > MAX_ECHO or n > len(payload) - LENGTH.size:
        return STATUS_TOO_LONG, b""
    return STATUS_OK, payload[LENGTH.size : LENGTH.size + n]


def completion(status: int, data: bytes) -> bytes:
    return LENGTH.pack(status) + data
