"""How exits travel: the control socket between a guest and the host.

One AF_UNIX SOCK_SEQPACKET connection per guest.  Every datagram the guest
sends is one exit (a trap to the hypervisor) and gets exactly one reply
datagram carrying an HV_STATUS code.  Requests:

====================  ==========================================  ==============
kind                  body                                        fds
====================  ==========================================  ==============
CONNECT (1)           u64 RAM size                                RAM memfd, SINT eventfd
HYPERCALL (2)         u64 control word + input block              -
WRMSR (3)             u32 MSR, u64 value                          -
IO (4)                u32 address, u8 size, u8 write, u16, u64    -
====================  ==========================================  ==============

Replies are a u32 status, with fds only for CONNECT_EVENT_PORT; an IO exit
(a trapped register access of an emulated device, the full-virtualization
and emulation cases) is answered with the status and the u64 value read.  Two
things do not use the socket because they need no round trip: a
HvSignalEvent on an open channel is one write to the channel's eventfd,
and host-to-guest messages and interrupts arrive through the SynIC pages
in guest RAM plus the SINT eventfd.

File descriptors cross with SCM_RIGHTS.  A receiver closes every fd it did
not ask for, so a guest cannot make the host leak descriptors.
"""

from __future__ import annotations

import array
import socket
import struct
from enum import IntEnum
from typing import Final

import trio

KIND: Final = struct.Struct("<I")
CONNECT_BODY: Final = struct.Struct("<Q")
WRMSR_BODY: Final = struct.Struct("<IQ")
IO_BODY: Final = struct.Struct("<IBBHQ")  # address, size, is_write, reserved, value
IO_REPLY: Final = struct.Struct("<IQ")  # status, value
CONTROL_WORD: Final = struct.Struct("<Q")
STATUS: Final = struct.Struct("<I")
MAX_DATAGRAM: Final = 512
MAX_FDS: Final = 4


class ExitKind(IntEnum):
    CONNECT = 1
    HYPERCALL = 2
    WRMSR = 3
    IO = 4


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


async def send_msg(sock: trio.socket.SocketType, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    await sock.sendmsg([data], anc)


class Truncated(Exception):
    """Peer sent a datagram or fd list larger than any valid one."""


async def recv_msg(sock: trio.socket.SocketType, max_fds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """One datagram and the fds that came with it (b"" at end of stream).

    Raises ``Truncated`` (with any fds already closed) when the datagram or
    its fds did not fit: such a message is malformed, never half-parsed."""
    data, anc, flags, _ = await sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(max_fds * 4))
    fds = _fds_from_ancdata(anc)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise Truncated(f"datagram of more than {MAX_DATAGRAM} bytes or {max_fds} fds")
    return data, fds


def close_fds(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
