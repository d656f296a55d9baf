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

File descriptors cross with SCM_RIGHTS.  A receiver takes every fd that
came (room for Linux's per-message maximum, so the kernel never drops one
on our behalf) and lets go of every fd it did not ask for, so a guest
cannot make the host leak descriptors.

Letting go of a guest's fd is not a plain close on the event loop: a close
runs the file's flush and, for the last reference, its release, and a guest
chooses what those do (a TCP socket with unsent data and SO_LINGER waits out
the linger time; a file on a FUSE mount the guest serves waits for the
guest).  Changing the object first (SO_LINGER 0, shutdown) is a race the
guest can win, since it shares the object.  So ``release_fds`` hands them
to ``FdReaper``: a few threads of its own that close them, any one of
which may wait as long as the guest makes it.  The number of threads is
bounded; the backlog is counted (``reaper.saturated`` tells a receiver to
stop accepting fds from that peer); idle threads exit.  ``fd_kind`` names
what an fd is (from /proc/self/fd, never by using it), for receivers that
check a guest's fd before they touch it.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterable
from enum import IntEnum
from typing import Final

import trio

log = logging.getLogger(__name__)

KIND: Final = struct.Struct("<I")
CONNECT_BODY: Final = struct.Struct("<Q")
WRMSR_BODY: Final = struct.Struct("<IQ")
IO_BODY: Final = struct.Struct("<IBBHQ")  # address, size, is_write, reserved, value
IO_REPLY: Final = struct.Struct("<IQ")  # status, value
CONTROL_WORD: Final = struct.Struct("<Q")
STATUS: Final = struct.Struct("<I")
MAX_DATAGRAM: Final = 512
MAX_FDS: Final = 4
SCM_MAX_FD: Final = 253  # Linux's limit of fds per message (include/net/scm.h)


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

    Raises ``Truncated`` (with any fds already released) when the datagram
    or its fds did not fit: such a message is malformed, never half-parsed."""
    data, anc, flags, _ = await sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(SCM_MAX_FD * 4))
    fds = _fds_from_ancdata(anc)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > max_fds:
        release_fds(fds)
        raise Truncated(f"datagram of more than {MAX_DATAGRAM} bytes or {max_fds} fds")
    return data, fds


def fd_kind(fd: int) -> str:
    """What ``fd`` is, as /proc/self/fd names it: "anon_inode:[eventfd]",
    "/memfd:name (deleted)", "socket:[ino]", "pipe:[ino]", a path..."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def is_eventfd(fd: int) -> bool:
    return fd_kind(fd) == "anon_inode:[eventfd]"


class FdReaper:
    """Closes fds whose close may block, on at most ``threads`` threads."""

    def __init__(self, threads: int = 4, backlog: int = 1024, idle_seconds: float = 1.0) -> None:
        self.max_threads = threads
        self.backlog = backlog
        self.idle_seconds = idle_seconds
        self._queue: deque[int] = deque()
        self._cond = threading.Condition()
        self._threads = 0
        self._idle = 0
        self.closed = 0

    @property
    def pending(self) -> int:
        """Fds waiting to be closed, plus those being closed."""
        return len(self._queue) + self._threads - self._idle

    @property
    def saturated(self) -> bool:
        return self.pending >= self.backlog

    def release(self, fds: Iterable[int]) -> None:
        with self._cond:
            self._queue.extend(fds)
            if not self._queue:
                return
            if self._idle:
                self._cond.notify(len(self._queue))
            elif self._threads < self.max_threads:
                self._threads += 1
                threading.Thread(target=self._run, name="fd-reaper", daemon=True).start()

    def _run(self) -> None:
        with self._cond:
            while True:
                while not self._queue:
                    self._idle += 1
                    woken = self._cond.wait(self.idle_seconds)
                    self._idle -= 1
                    if not woken and not self._queue:
                        self._threads -= 1
                        return
                fd = self._queue.popleft()
                self._cond.release()
                try:
                    os.close(fd)  # may block as long as the fd's owner makes it
                except OSError:
                    pass
                finally:
                    self._cond.acquire()
                    self.closed += 1

    def drain(self, timeout: float) -> bool:
        """Wait (blocking) until nothing is pending; for orderly shutdown and tests."""
        import time

        deadline = time.monotonic() + timeout
        while self.pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True


reaper = FdReaper()


def release_fds(fds: Iterable[int]) -> None:
    """Let go of fds a peer passed (closed off the caller's thread)."""
    reaper.release(fds)
