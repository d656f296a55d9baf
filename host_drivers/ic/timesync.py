"""Timesync host: samples of the host's clock for the guest.

After negotiation one SYNC, then a SAMPLE every ``interval`` seconds
(config, default 5 s), each a transaction, as OpenVMM's host does.  A
sample is the host's wall clock in 100 ns units since 1601 (``parenttime``)
and, read right after it, the partition reference counter
(``vmreferencetime``, read with it by ``ic.read_clocks``), so the guest can correct
for the time the sample spent in the ring.  ``clock`` in the config (a
callable returning Unix nanoseconds, for embedding and tests) replaces the
host's wall clock.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from vmbus.protocols import ic

from .service import IcError, IcHost, positive_seconds


class TimesyncHost(IcHost):
    NAME = "timesync"
    MSGTYPE = ic.MsgType.TIMESYNC
    VERSIONS = ic.TIMESYNC_VERSIONS[0]

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.interval = positive_seconds(config, "interval", 5.0)
        self.clock = config.get("clock", time.time_ns)
        if not callable(self.clock):
            raise ValueError("timesync clock must be a callable returning Unix nanoseconds")
        self.samples_answered = 0
        self.last_sample: float | None = None

    def sample(self, flags: int) -> bytes:
        """A sample body, both clocks read as close together as we can."""
        wall, reference = ic.read_clocks(self.clock)
        return ic.encode_timesync(ic.unix_ns_to_wintime(wall), reference, flags)

    async def run(self) -> None:
        flags = ic.TIMESYNC_SYNC
        while True:
            try:
                await self.request(self.MSGTYPE, self.sample(flags))
            except IcError:
                pass  # counted (timeouts, failed); the next sample tries again
            else:
                self.samples_answered += 1
                self.last_sample = time.time()
                flags = ic.TIMESYNC_SAMPLE
            await trio.sleep(self.interval)

    def service_snapshot(self) -> dict[str, Any]:
        return {"interval": self.interval, "samples_answered": self.samples_answered, "last_sample": self.last_sample}
