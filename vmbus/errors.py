"""Errors of the bus, split by who did it (trio's style)."""

from __future__ import annotations

import trio

from .hv import HvStatus


class VmbusError(Exception):
    """Base of the bus's errors."""


class ChannelClosed(VmbusError, trio.ClosedResourceError):
    """We closed the channel ourselves and then used it."""


class ChannelRevoked(VmbusError, trio.BrokenResourceError):
    """The host rescinded the device; requests in flight and later ones fail."""


class HostGone(ChannelRevoked):
    """The host went away: the guest's control socket closed or failed.  It
    takes every channel with it, so it is a revocation of them all: requests
    in flight and later ones fail, and so does every wait for the host."""


class RegisterAccessRefused(VmbusError):
    """An emulated device model refuses a trapped register access (a size its
    register does not have); the exit is answered INVALID_PARAMETER."""


class BootError(VmbusError):
    """The guest could not connect, negotiate or enumerate."""


class NoCommonVersion(BootError):
    """The host accepts none of the VMBus versions the guest offered."""


class HypercallFailed(VmbusError):
    """A hypercall answered with an error status (named, with its code)."""

    def __init__(self, what: str, status: int) -> None:
        try:
            name = HvStatus(status).name
        except ValueError:
            name = "unknown"
        super().__init__(f"{what} failed with HV_STATUS {status:#x} ({name})")
        self.status = status
