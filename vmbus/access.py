"""Who can reach the host: its listening sockets and the peers it accepts.

The guest socket and the admin socket are created owner-only, mode 0600:
the umask is narrowed around ``bind()`` so the file never exists with a
wider mode, its mode (and group) are set exactly before ``listen()``, and
until ``listen()`` a connect is refused, so nobody gets in early.  A group
(``pvbus host --group NAME``) shares both sockets: mode 0660, file group set
to it.  The umask is process-wide; narrowing it for the length of one
``bind()`` can only make a file another thread creates meanwhile narrower,
never wider.

File permissions are the first gate.  The second is the peer's credentials,
which the kernel records at ``connect()`` (SO_PEERCRED: pid, uid, primary
gid; SO_PEERGROUPS: supplementary groups), checked on every accepted
connection: the host's own uid, root, or, with a group, a process whose
primary or supplementary groups include it.  Anyone else is closed at once,
with one log line.  (A peer in more than 256 groups is judged by its primary
group alone: the kernel's list does not fit the largest option buffer.)

A socket path is taken only when it is free or stale, i.e. a socket file
whose connect is refused.  A live one (another host), one we may not probe,
or a path that is not a socket (a user's file) is refused with one clear
line and left alone.  The host remembers the device and inode of each
socket file it created and removes the path on exit only while it is still
that file.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

from .errors import VmbusError

log = logging.getLogger(__name__)

UCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13, include/uapi/asm-generic/socket.h
MAX_GROUPS_BUFFER = 1024  # CPython's getsockopt buffer limit: 256 gids
PROBE_TIMEOUT = 1.0


class HostSocketError(VmbusError):
    """The host cannot listen where it was asked: the path is in use, is not a
    socket, its directory is missing, or the group does not exist."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> PeerCredentials:
    """The credentials the kernel recorded when the peer connected."""
    pid, uid, gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, MAX_GROUPS_BUFFER)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:  # ERANGE (too many groups) or an old kernel: the primary group only
        groups = ()
    return PeerCredentials(pid, uid, gid, tuple(groups))


@dataclass(frozen=True)
class Access:
    """Who may connect: the owner (the host's uid), root, and one optional group."""

    owner: int
    group: int | None = None
    group_name: str | None = None

    @classmethod
    def for_group(cls, name: str | None) -> Access:
        """Owner-only access, or shared with the group ``name`` (a name or a number)."""
        if name is None:
            return cls(os.geteuid())
        try:
            return cls(os.geteuid(), grp.getgrnam(name).gr_gid, name)
        except KeyError:
            if name.isdigit():
                return cls(os.geteuid(), int(name), name)
        raise HostSocketError(f"no group named {name!r} (see getent group)")

    @property
    def mode(self) -> int:
        return 0o600 if self.group is None else 0o660

    def allows(self, peer: PeerCredentials) -> bool:
        if peer.uid in (self.owner, 0):
            return True
        return self.group is not None and (peer.gid == self.group or self.group in peer.groups)

    def describe(self) -> str:
        who = f"uid {self.owner} and root"
        return who if self.group is None else f"{who} and group {self.group_name} ({self.group})"

    def admits(self, sock: socket.socket | trio.socket.SocketType, what: str) -> bool:
        """Check an accepted connection's peer; log one line when refusing it."""
        try:
            peer = peer_credentials(sock)
        except OSError as exc:
            log.warning("%s: refused a peer whose credentials cannot be read: %s", what, exc)
            return False
        if self.allows(peer):
            return True
        log.warning("%s: refused pid %d (uid %d, gid %d): only %s may connect",
                    what, peer.pid, peer.uid, peer.gid, self.describe())
        return False


@dataclass
class Listener:
    """A listening AF_UNIX socket and the identity of the file it made."""

    sock: socket.socket
    path: Path
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file bind() created

    def close(self) -> None:
        self.sock.close()
        remove_if_ours(self.path, self.identity)


def remove_if_ours(path: Path, identity: tuple[int, int]) -> None:
    """Unlink ``path`` only while it is still the file with ``identity``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != identity:
        log.warning("%s is no longer the socket this host created; left in place", path)
        return
    path.unlink(missing_ok=True)


def _claim(path: Path, kind: int) -> None:
    """Make ``path`` free for bind(): nothing there, or a stale socket removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HostSocketError(f"{path} exists and is not a socket; not touching it (choose another --socket)")
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        # Nobody listens: a socket left behind by a host that died.  Remove
        # it, unless it was replaced while we probed.
        remove_if_ours(path, (st.st_dev, st.st_ino))
        return
    except OSError as exc:  # no permission, a socket of another kind, a full backlog
        raise HostSocketError(f"{path} is in use by another process ({exc.strerror or exc}); "
                              "not taking it over") from None
    finally:
        probe.close()
    raise HostSocketError(f"another host is serving {path}; stop it first or choose another --socket")


def _set_owner_and_mode(path: Path, access: Access) -> tuple[int, int]:
    """Give the file bind() just created its group and exact mode, through an
    O_PATH descriptor (so a path swapped meanwhile is noticed, not followed);
    returns its identity.  On failure the file is removed if still ours."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise HostSocketError(f"{path} was replaced while the host created it")
        identity = st.st_dev, st.st_ino
        inode = f"/proc/self/fd/{fd}"  # the file itself, whatever the path now names
        try:
            if access.group is not None:
                os.chown(inode, -1, access.group)
            os.chmod(inode, access.mode)
        except OSError as exc:
            remove_if_ours(path, identity)
            what = f"give {path} to group {access.group_name}" if access.group is not None else f"chmod {path}"
            raise HostSocketError(f"cannot {what}: {exc.strerror or exc}") from None
        return identity
    finally:
        os.close(fd)


def listen_unix(path: Path, kind: int, access: Access, backlog: int) -> Listener:
    """A listening socket at ``path`` that only ``access`` lets in."""
    _claim(path, kind)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        umask = os.umask(0o777 & ~access.mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(umask)
    except OSError as exc:
        sock.close()
        raise HostSocketError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    try:
        listener = Listener(sock, path, _set_owner_and_mode(path, access))
    except OSError as exc:
        sock.close()
        raise HostSocketError(f"cannot set up {path}: {exc.strerror or exc}") from None
    except HostSocketError:
        sock.close()
        raise
    try:
        sock.listen(backlog)
    except OSError as exc:
        listener.close()
        raise HostSocketError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return listener
