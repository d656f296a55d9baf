"""A real program run in the guest (``pvbus guest --exec -- CMD ARGS...``).

The order of things, all in the guest kernel's process and trio loop:

1. the guest's namespaces (``guest_kernel.namespaces``): mount and UTS
   (host name ``pvbus-guest-<pid of the guest process>``; the guest is
   not told its partition number), network and PID where allowed;
2. each storvsc disk as ``/dev/pvbus/diskN`` (``fuse_disk``), served from
   this loop while the program runs;
3. each ``--mount diskN:/dir[:type]``: a loop device over the disk's file,
   mounted by the real ``mount(8)``: Linux's own ext4 or vfat is then the
   guest's file system;
4. CMD, with our stdin, stdout and stderr, as PID 1 of its PID namespace;
   SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to the guest
   are passed on to it (a PID 1 with no handler ignores SIGTERM, so after
   ``STOP_GRACE`` a stop becomes SIGKILL);
5. CMD exits: its status is the guest's (128 + N when signal N ended it);
   every mount made in the guest is taken down (children first: what CMD
   mounted and left, then ours), loop devices let go, open files released,
   written disks flushed (SYNCHRONIZE CACHE, the host's fdatasync), the
   FUSE file system unmounted; the caller then shuts the guest down.

If the guest is cancelled instead (its host went away, or it was asked to
stop), CMD gets SIGTERM, then SIGKILL after ``HOST_GONE_GRACE``, and the
same teardown runs (the disk answering EIO by then); the caller says why
in one line.  Unmounting runs in a worker thread: an ext4 unmount writes
through the loop device into the FUSE file that this loop serves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..namespaces import GuestNamespaces, NamespaceError, attach_loop, detach_loop, mount
from .fuse_disk import MOUNTPOINT, PresenterError, fuse_available, presented

log = logging.getLogger(__name__)

RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOP_GRACE = 5.0  # seconds a program told to stop (SIGTERM, SIGINT) has before SIGKILL
HOST_GONE_GRACE = 0.5  # ... when the host went away: the guest ends within about a second
TEARDOWN_WAIT = 60.0  # seconds for unmounting and flushing at the end, at most


@dataclass(frozen=True)
class MountRequest:
    disk: str
    target: str
    fstype: str | None = None

    @classmethod
    def parse(cls, text: str) -> MountRequest:
        """``disk0:/mnt`` or ``disk0:/mnt:ext4``; ValueError, in words."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise ValueError(f"{text!r} is not DISK:DIR[:TYPE] (e.g. disk0:/mnt:ext4)")
        if not parts[1].startswith("/"):
            raise ValueError(f"mount point {parts[1]!r} must be an absolute path (e.g. disk0:/mnt)")
        return cls(parts[0], parts[1], (parts[2] or None) if len(parts) == 3 else None)


class CommandFailed(Exception):
    """The guest could not set up or run the program: one line."""


def guest_disks(kernel: Any) -> dict[str, Any]:
    """The guest's storvsc disks by name (``disk0``, ``disk1``... in the
    order the host offered them)."""
    from ..drivers.storvsc import StorvscDriver

    drivers = [d.driver for _, d in sorted(kernel.devices.items())
               if isinstance(d.driver, StorvscDriver) and d.state.value == "open" and d.primary is None]
    return {f"disk{i}": driver for i, driver in enumerate(drivers)}


async def run_command(kernel: Any, argv: Sequence[str], mounts: Sequence[MountRequest] = ()) -> int:
    """Run ``argv`` in the guest (see the module's notes); its exit status."""
    if not argv:
        raise CommandFailed("--exec needs a command (e.g. --exec -- sh -c 'echo hello')")
    disks = guest_disks(kernel)
    for request in mounts:
        if request.disk not in disks:
            have = ", ".join(disks) or "no disk (start the host with --disk)"
            raise CommandFailed(f"cannot mount {request.disk}: this guest has {have}")
    namespaces = GuestNamespaces(f"pvbus-guest-{os.getpid()}")
    try:
        namespaces.enter()
    except NamespaceError as exc:
        raise CommandFailed(str(exc.strerror)) from None
    async with contextlib.AsyncExitStack() as stack:
        if disks and (missing := fuse_available()) is not None:
            if mounts:
                raise CommandFailed(f"cannot show the disks to programs: {missing}")
            log.warning("the disks are not shown as files in the guest: %s", missing)
        elif disks:
            try:
                await stack.enter_async_context(presented(disks))
            except PresenterError as exc:
                raise CommandFailed(str(exc.strerror)) from None
        loops: list[str] = []
        stack.push_async_callback(_take_down, namespaces, loops)
        for request in mounts:
            try:
                loops.append(await attach_loop(f"{MOUNTPOINT}/{request.disk}"))
                await mount(loops[-1], request.target, request.fstype)
            except NamespaceError as exc:
                raise CommandFailed(str(exc.strerror)) from None
        return await _run(namespaces, argv)
    raise AssertionError("unreachable")  # the exit stack swallows nothing


async def _run(namespaces: GuestNamespaces, argv: Sequence[str]) -> int:
    try:
        proc = namespaces.spawn(argv)
    except FileNotFoundError:
        raise CommandFailed(f"cannot run {argv[0]}: no such program in the guest") from None
    except PermissionError:
        raise CommandFailed(f"cannot run {argv[0]}: permission denied") from None
    except NamespaceError as exc:
        raise CommandFailed(str(exc.strerror)) from None
    pidfd = os.pidfd_open(proc.pid)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay_signals, proc, nursery)
            await trio.lowlevel.wait_readable(pidfd)
            nursery.cancel_scope.cancel()
        return _status(proc.wait())
    finally:
        if proc.poll() is None:  # cancelled: the host went away, or the guest was told to stop
            with trio.CancelScope(shield=True):
                await _end(proc, pidfd, HOST_GONE_GRACE)
        os.close(pidfd)


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def _relay_signals(proc: subprocess.Popen[bytes], nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(*RELAYED) as signals:
        async for signum in signals:
            _send(proc, signum)
            if signum in (signal.SIGTERM, signal.SIGINT):
                nursery.start_soon(_kill_after, proc, STOP_GRACE)


async def _kill_after(proc: subprocess.Popen[bytes], seconds: float) -> None:
    await trio.sleep(seconds)
    if proc.poll() is None:
        log.info("the program did not stop within %.0f s of being told: killing it", seconds)
        _send(proc, signal.SIGKILL)


def _send(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


async def _end(proc: subprocess.Popen[bytes], pidfd: int, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; wait for the exit."""
    _send(proc, signal.SIGTERM)
    with trio.move_on_after(grace):
        await trio.lowlevel.wait_readable(pidfd)
    if proc.poll() is None:
        _send(proc, signal.SIGKILL)
        with trio.move_on_after(TEARDOWN_WAIT):
            await trio.lowlevel.wait_readable(pidfd)
    proc.poll()


async def _take_down(namespaces: GuestNamespaces, loops: list[str]) -> None:
    """Unmount what the guest mounted (CMD's and ours), let go of our loop
    devices; in a worker thread, while this loop serves the FUSE files."""

    def take_down() -> None:
        for target in namespaces.unmount_added(keep=[MOUNTPOINT]):
            log.debug("unmounted %s", target)
        for device in loops:
            detach_loop(device)

    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + TEARDOWN_WAIT
        await trio.to_thread.run_sync(take_down, abandon_on_cancel=True)
    if scope.cancelled_caught:
        log.warning("unmounting the guest's file systems took over %.0f s; going on", TEARDOWN_WAIT)
