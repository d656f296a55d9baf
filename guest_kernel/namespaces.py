"""The guest's own namespaces, where real programs run (``--exec``).

The guest process is the guest kernel: it keeps serving its drivers while
a program runs, so it moves *itself* into new mount and UTS namespaces
(and a network namespace where the machine allows) and then starts the
program there, with a PID namespace of the program's own:

- ``enter(hostname)``: ``unshare(CLONE_NEWNS | CLONE_NEWUTS)``, every
  mount made private (nothing mounted here propagates to the host, nor the
  host's later mounts here), the host name set; then
  ``unshare(CLONE_NEWNET)`` with the loopback interface up, when allowed.
  It remembers the mount table as it found it, so ``unmount_added`` can
  take down, newest first, whatever the guest mounted since (its own
  mounts and the program's).
- ``spawn(argv)``: the program as the first process (PID 1) of a new PID
  namespace when allowed: ``unshare(CLONE_NEWPID)`` changes only where
  this process's *next* child goes, and a process whose children go to
  another PID namespace may not start threads, so the window is one
  ``Popen`` wide and ``setns`` puts our own namespace back right after.
  When PID 1 exits, Linux ends every other process of its namespace: a
  program leaves nothing behind.  As any PID 1, it gets from us only the
  signals it has a handler for (SIGKILL always).  ``/proc`` is the
  host's (remounting it would change it for the guest kernel too).
- ``attach_loop`` / ``detach_loop``: a loop device over a file
  (``losetup --find --show``, util-linux; the detach is the
  ``LOOP_CLR_FD`` ioctl, which needs no new process) and ``mount``, the
  real ``mount(8)``.  The helpers run as child processes while the trio
  loop keeps serving the file they open (it is the guest's own FUSE file).

System calls go through ``ctypes`` on libc (``os.unshare`` and
``os.setns`` only exist from Python 3.12).  Every step needs root (or
CAP_SYS_ADMIN); what is refused is said in one line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
LOOP_CLR_FD = 0x4C01  # linux/loop.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]


class NamespaceError(OSError):
    """A namespace, mount or loop device the guest could not have: one line."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"{what}: {os.strerror(err)}")


@dataclass(frozen=True)
class Mount:
    mount_id: int
    target: str
    source: str
    fstype: str
    device: tuple[int, int]  # the file system's (major, minor)


def mount_table() -> list[Mount]:
    """This process's mounts (``/proc/self/mountinfo``), parents before children."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            major, minor = fields[2].split(":")
            out.append(Mount(int(fields[0]), _unescape(fields[4]), _unescape(fields[sep + 2]), fields[sep + 1],
                             (int(major), int(minor))))
    return out


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return text.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


@dataclass
class GuestNamespaces:
    hostname: str
    have: list[str] = field(default_factory=list)  # namespaces made: mount, uts, net, pid
    _original_mounts: set[int] = field(default_factory=set)
    _pid_for_children: bool = False

    def enter(self) -> None:
        """Move this process into its own mount and UTS namespaces (required)
        and network namespace (where allowed)."""
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS),
               "cannot create the guest's mount and UTS namespaces (needs root or CAP_SYS_ADMIN)")
        self.have += ["mount", "uts"]
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "cannot make the guest's mounts private")
        socket.sethostname(self.hostname)
        if _libc.unshare(CLONE_NEWNET) == 0:
            self.have.append("net")
            _loopback_up()
        else:
            log.debug("no network namespace: %s", os.strerror(ctypes.get_errno()))
        self._original_mounts = {m.mount_id for m in mount_table()}
        self._pid_for_children = self._try_pid_namespace()
        if self._pid_for_children:
            self.have.append("pid")
        log.debug("guest namespaces: %s (hostname %s)", ", ".join(self.have), self.hostname)

    def _try_pid_namespace(self) -> bool:
        """Whether ``spawn`` can start a program in a PID namespace of its own
        (tried once here: unshare, then straight back)."""
        with open("/proc/self/ns/pid", "rb") as own:
            if _libc.unshare(CLONE_NEWPID) != 0:
                log.debug("no PID namespace: %s", os.strerror(ctypes.get_errno()))
                return False
            self._restore_pid_for_children(own.fileno())
        return True

    @staticmethod
    def _restore_pid_for_children(own_fd: int) -> None:
        _check(_libc.setns(own_fd, CLONE_NEWPID), "cannot return to the guest kernel's PID namespace")

    def spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` with our stdin, stdout and stderr, as PID 1 of a new
        PID namespace when the machine allows it.  It is SIGKILLed if the
        guest process dies without ending it (PR_SET_PDEATHSIG)."""
        if not self._pid_for_children:
            return subprocess.Popen(list(argv), preexec_fn=_die_with_parent)
        with open("/proc/self/ns/pid", "rb") as own:
            _check(_libc.unshare(CLONE_NEWPID), "cannot create the program's PID namespace")
            try:
                # No thread may start in this window (clone(CLONE_THREAD) fails
                # while children go to another PID namespace): Popen forks and
                # execs in this thread, and no trio task runs until we return.
                return subprocess.Popen(list(argv), preexec_fn=_die_with_parent)
            finally:
                self._restore_pid_for_children(own.fileno())

    def unmount_added(self, keep: Sequence[str] = ()) -> list[str]:
        """Unmount, children first, every mount made in the guest since
        ``enter`` (but those at ``keep``); returns the targets unmounted.

        Each file system is synced first (``syncfs``): its dirty data goes
        down through its loop device into the disk's file while this
        process still serves it.  A mount still busy (the program's last
        processes are still exiting: a PID namespace's members die after
        its PID 1) is retried for ``BUSY_WAIT`` seconds, and only then
        detached lazily, with a warning: a lazy detach finishes after the
        disk's file is gone, so whatever the sync did not write is lost."""
        done = []
        for m in reversed(mount_table()):
            if m.mount_id in self._original_mounts or m.target in keep:
                continue
            _sync_file_system(m.target)
            deadline = time.monotonic() + BUSY_WAIT
            while _libc.umount2(os.fsencode(m.target), 0) != 0:
                err = ctypes.get_errno()
                if err == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                log.warning("unmounting %s: %s; detaching it lazily", m.target, os.strerror(err))
                _libc.umount2(os.fsencode(m.target), MNT_DETACH)
                break
            done.append(m.target)
        return done


BUSY_WAIT = 10.0  # seconds a busy mount is retried before a lazy detach


def _sync_file_system(target: str) -> None:
    """``syncfs`` the file system mounted at ``target`` (best effort)."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("syncing %s: %s", target, exc)
        return
    try:
        if _libc.syncfs(fd) != 0:
            log.debug("syncing %s: %s", target, os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the guest process goes (a
    guest killed outright leaves no program behind)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def mount_fs(fstype: str, target: str) -> None:
    """Mount a pseudo file system (no device) in this process's namespace."""
    _check(_libc.mount(fstype.encode(), os.fsencode(target), fstype.encode(), 0, None),
           f"cannot mount {fstype} on {target}")


def _loopback_up() -> None:
    """``ip link set lo up`` in a new network namespace (SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


async def _helper(argv: list[str], what: str) -> str:
    """Run a system tool without blocking the loop; its stdout, or one line."""
    try:
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    except FileNotFoundError:
        raise NamespaceError(errno.ENOENT, f"{what}: {argv[0]} is not installed (util-linux)") from None
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise NamespaceError(errno.EIO, f"{what}: {reason[-1] if reason else f'status {done.returncode}'}")
    return done.stdout.decode().strip()


def loop_devices_available() -> str | None:
    """Why loop devices cannot be used here, or None."""
    if not os.path.exists("/dev/loop-control"):
        return "there is no /dev/loop-control (load the loop module, or give the guest the loop devices)"
    if not os.access("/dev/loop-control", os.R_OK | os.W_OK):
        return "/dev/loop-control is not open to us (loop devices need root)"
    return None


async def attach_loop(path: str) -> str:
    """A free loop device over ``path``; returns its name (``/dev/loopN``)."""
    if (missing := loop_devices_available()) is not None:
        raise NamespaceError(errno.ENODEV, f"cannot attach {path} to a loop device: {missing}")
    return await _helper(["losetup", "--find", "--show", path], f"cannot attach {path} to a loop device")


def detach_loop(device: str) -> None:
    """Let go of a loop device (``LOOP_CLR_FD``; Linux frees it once unused)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot detach %s: %s", device, exc.strerror)
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # already detached
            log.warning("cannot detach %s: %s", device, exc.strerror)
    finally:
        os.close(fd)


async def mount(device: str, target: str, fstype: str | None) -> None:
    """``mount [-t fstype] device target`` in this process's namespace."""
    if not os.path.isdir(target):
        raise NamespaceError(errno.ENOTDIR, f"cannot mount on {target}: there is no such directory")
    argv = ["mount", *(["-t", fstype] if fstype else []), device, target]
    await _helper(argv, f"cannot mount {device} on {target}")
