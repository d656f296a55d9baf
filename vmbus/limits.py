"""What one guest, and all guests together, may hold in the host.

Every resource a guest can make the host allocate by asking has a cap per
partition and a cap across the host process, so no guest can exhaust the
host and a few guests together cannot either.  A request beyond a cap is
refused with an HV_STATUS (and, where the protocol has one, a failure
response) plus one log line naming the cap; the guest keeps running.

=====================  ===========  =============  ===============================
resource               per guest    whole host     host memory it stands for
=====================  ===========  =============  ===============================
GPADLs                 1,024        -              ~200 bytes each
GPADL pages            262,144      4,194,304      8 bytes a page (1 GiB / 32 MiB)
open channels          256          4,096          an eventfd, a task (a thread for C paths)
queued SynIC messages  256          65,536         at most 240 bytes each
=====================  ===========  =============  ===============================

Partitions themselves are bounded by who may connect (the guest socket's
permissions) and by the open-channel and GPADL caps above: a connected
guest with nothing open costs a mapping of its RAM, two fds and a thread.

``Budget`` counts the whole-host totals; each partition counts its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    gpadls: int = 1024
    gpadl_pages: int = 1 << 18
    open_channels: int = 256  # every hv_sock connection is a channel of its own
    queued_messages: int = 256
    total_gpadl_pages: int = 1 << 22
    total_open_channels: int = 4096
    total_queued_messages: int = 65536


class Budget:
    """The host-wide totals, shared by every partition of one host process."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._lock = threading.Lock()  # messages are queued from storage worker threads too
        self.held = {"gpadl_pages": 0, "open_channels": 0, "queued_messages": 0}

    def take(self, what: str, n: int = 1) -> bool:
        """Reserve ``n`` of ``what`` against the host-wide cap; False if over it."""
        cap = getattr(self.limits, f"total_{what}")
        with self._lock:
            if self.held[what] + n > cap:
                return False
            self.held[what] += n
            return True

    def give(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.held[what] -= n

    def snapshot(self) -> dict[str, object]:
        return {"held": dict(self.held), "limits": {f.name: getattr(self.limits, f.name) for f in fields(self.limits)}}


HOST_BUDGET = Budget()
