"""Heartbeat host: is the guest alive?

Every ``interval`` seconds (config, default 1 s) the host sends the next
sequence number and the guest answers with it plus one.  One beat is in
flight at a time: while it is unanswered no further beat is sent, and each
``interval`` that passes counts one missed beat.  At ``MISSES_REPORTED``
(3) missed beats the guest is reported lost: ``health`` becomes ``lost``
and one warning line is logged; the next good answer makes it ``alive``
again (one info line).  ``pvbus inspect`` shows the sequence, the last time
the guest answered and the health.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from vmbus.protocols import ic

from .service import IcHost, positive_seconds

log = logging.getLogger(__name__)
MISSES_REPORTED = 3


class HeartbeatHost(IcHost):
    NAME = "heartbeat"
    MSGTYPE = ic.MsgType.HEARTBEAT
    VERSIONS = ic.HEARTBEAT_VERSIONS[0]

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.interval = positive_seconds(config, "interval", 1.0)
        self.health = "waiting"  # waiting (no answer yet) -> alive <-> lost
        self.sequence = 0
        self.beats_answered = 0
        self.missed = 0
        self.last_seen: float | None = None  # host wall clock of the last good answer

    async def run(self) -> None:
        while True:
            self.sequence = (self.sequence + 1) % ((1 << 64) - 1)  # the answer, sequence + 1, fits a u64 too
            sent = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._count_missed)
                answer = await self.transact(self.MSGTYPE, ic.HEARTBEAT.pack(self.sequence), timeout=None)
                nursery.cancel_scope.cancel()
            self._answered(answer)
            await trio.sleep_until(sent + self.interval)

    async def _count_missed(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.missed += 1
            if self.missed >= MISSES_REPORTED and self.health != "lost":
                self.health = "lost"
                log.warning("heartbeat (channel %d): the guest missed %d beats (%g s apart): reported lost",
                            self._relid(), self.missed, self.interval)

    def _answered(self, answer: ic.IcMessage) -> None:
        try:
            echoed = ic.parse_heartbeat(answer.body)
        except ic.IcFormatError as exc:
            self.refuse("bad_messages", f"heartbeat answer: {exc}")
            return
        if answer.status != ic.Status.OK or echoed != self.sequence + 1:
            self.refuse("bad_messages", f"heartbeat answer {echoed} with status {ic.status_name(answer.status)} "
                                        f"to sequence {self.sequence}")
            return
        if self.health == "lost":
            log.info("heartbeat (channel %d): the guest answers again after %d missed beats",
                     self._relid(), self.missed)
        self.health = "alive"
        self.missed = 0
        self.beats_answered += 1
        self.last_seen = time.time()

    def service_snapshot(self) -> dict[str, Any]:
        return {
            "health": self.health,
            "sequence": self.sequence,
            "beats_answered": self.beats_answered,
            "missed": self.missed,
            "interval": self.interval,
            "last_seen": self.last_seen,
            "last_seen_ago": None if self.last_seen is None else round(time.time() - self.last_seen, 3),
        }
