"""The queue layer, Python face: the one owner of the wake-up rules.

Every decision about waking up (docs/vmbus-reference section 1.7) is made
here or in its C half (``ring/csrc/queue.c``), never in a device:

Consumer of a ring (``drain``; the host's pure-Python devices through
``Channel.receive``, and the guest's interrupt task): mask the inbound
interrupt, let ``take`` drain and commit a batch; when it found nothing,
poll if asked to, then unmask and re-check, and sleep on the interrupt
only when the re-check finds the ring empty.  (The C server ``pv_serve``
does the same for devices with a C handler, and ``ring.queue.Waiter``
gives its waits to a process without trio, such as the ring benchmark's.)

Submitter that polls for its own completions (``Poller``, the guest side
of a request/completion device):

- mask before publishing: a submitter that will poll holds its queue
  *before* it publishes the requests (a small request completes within
  microseconds, often before the submitter gets to poll, and an unmasked
  completion costs the host an interrupt and us a wake-up);
- masks are held, not set: a queue's interrupt is masked while anyone
  holds it, and a holder lets go before it sleeps on anything, so a masked
  queue always has a task that will look at it;
- the last poller re-checks after each of its own reaps: letting go
  unmasks and re-checks, and when it reaps what the re-check found it
  must re-check again.  A completion the host publishes while our reaped
  ones are not yet released saw a non-empty ring and raised no signal
  (the empty -> non-empty rule), so only a look after our commit finds it:
  checking once lost one request in ~300k, for good.

Publishing (``Poller.publish``) stages with the device's C builder,
commits per batch (one index store, a signal only when the ring says so)
and, when the ring is full, lets go and waits for room through
pending_send_sz (``Channel.wait_for_room``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import trio

from ring import RingCorrupt
from ring.queue import PollSet

if TYPE_CHECKING:
    from .channel import Batch, Channel, Requestor

__all__ = ["Poller", "PollerStatistics", "drain"]


async def drain(channel: Channel, take: Callable[[], Any]) -> Any:
    """Call ``take`` with ``channel``'s interrupt masked until it returns
    something truthy; in between poll (``channel.poll_spins``), unmask,
    re-check and sleep.  ``take`` reads packets itself and releases them
    with ``channel.commit_read`` before returning (the re-check must come
    after that commit).  Returns still masked: the next call drains again
    before it may sleep."""
    inc = channel.incoming
    while True:
        channel.check()
        inc.mask()  # fenced in C: the producer sees it before we drain
        try:
            got = take()
        except RingCorrupt:
            channel.stats.corrupt = True
            raise
        if got:
            return got
        if channel.poll_spins and inc.poll(channel.poll_spins):
            channel.polls_hit += 1
            continue  # arrived while we spun, masked: no interrupt was spent on it
        if inc.unmask():  # clear, full fence, re-check (ring.c)
            continue  # arrived after the drain and before the unmask: no signal is coming
        await channel.wait_interrupt()


@dataclass
class PollerStatistics:
    polls_hit: int = 0  # completions found by polling (no interrupt spent)
    rechecks: int = 0  # reaps done by the last holder after its unmask
    ring_full_waits: int = 0


class Poller:
    """One guest queue's polling and masking: ``requestor`` is its request
    table (``vmbus.channel.Requestor``), ``reap()`` takes, settles and
    commits every completion waiting and returns how many (the device's C
    decoder does the per-packet work), ``poll_us`` how long one poll spins
    (0: pure interrupt mode), ``wanted()`` whether polling pays right now.

    ``group()`` gives the pollers polled together, this one among them (a
    multi-queue device polls all its queues; default: this one alone)."""

    def __init__(self, requestor: Requestor, reap: Callable[[], int], poll_us: int, *,
                 wanted: Callable[[], bool] | None = None,
                 group: Callable[[], list[Poller]] | None = None) -> None:
        self.requestor = requestor
        self.channel = requestor.channel
        self.reap = reap
        self.poll_us = poll_us
        self._wanted = wanted
        self.group = group or (lambda: [self])
        self.stats = PollerStatistics()
        self._holders: set[object] = set()

    def wanted(self) -> bool:
        return bool(self.poll_us) and (self._wanted is None or self._wanted())

    def snapshot(self) -> dict[str, int]:
        """This queue's statistics for a report (``pvbus inspect`` style):
        the ``PollerStatistics`` fields and the requests in flight."""
        return {**asdict(self.stats), "outstanding": self.requestor.outstanding}

    # -- holding the interrupt mask -------------------------------------

    def hold(self, holder: object) -> None:
        """``holder`` is about to poll this queue: no interrupts needed."""
        if not self._holders:
            self.channel.incoming.mask()
        self._holders.add(holder)

    def let_go(self, holder: object) -> None:
        """``holder`` stops looking.  The last holder unmasks and re-checks,
        and re-checks again after each reap (see the module notes)."""
        if holder not in self._holders:
            return
        self._holders.discard(holder)
        while not self._holders and self.channel.active and self.channel.incoming.unmask():
            self.stats.rechecks += 1
            self.reap()

    # -- the submitter's side ---------------------------------------------

    async def publish(self, holder: object, stage: Callable[[], tuple[int, bool, int]]) -> None:
        """Publish a batch: hold first when polling is wanted, then call
        ``stage()`` -> (staged, all staged, room needed) until all are in,
        committing after each call that staged some; when nothing fitted,
        let go and wait for room."""
        if self.wanted():
            self.hold(holder)  # masked before the host can answer
        while True:
            staged, complete, needed = stage()
            if staged:
                self.channel.stats.packets_sent += staged
                self.channel.commit_write()
            if complete:
                return
            if not staged:
                self.let_go(holder)  # sleeping: the interrupt must be able to wake us
                self.stats.ring_full_waits += 1
                await self.channel.wait_for_room(needed)

    async def wait(self, batch: Batch) -> None:
        """Poll every busy queue of the group for up to ``poll_us`` at a
        time, reaping whatever arrives, until ``batch`` is done; sleep on
        the interrupt once a poll comes back empty.

        Whenever our reaping completes another task's batch we step aside
        so that it runs at once (it has its results, and likely its next
        requests to send); otherwise the poll keeps the CPU for at most
        ``poll_us``.  (Asking trio whether any task is runnable costs more
        than a 4 KiB request: its statistics walk every registered fd.)"""
        try:
            while not batch.done.is_set() and self.channel.active and self.wanted():
                busy = [p for p in self.group() if p.requestor.outstanding and p.channel.active]
                for p in busy:
                    p.hold(batch)
                rings = PollSet([p.channel.incoming for p in busy])
                woke_another = False
                while not batch.done.is_set():
                    ready = rings.poll(self.poll_us)
                    if ready < 0:
                        break
                    poller = busy[ready]
                    poller.stats.polls_hit += 1  # came while we polled: no interrupt spent on it
                    completed = poller.requestor.batches_completed
                    poller.reap()
                    if poller.requestor.batches_completed - completed > batch.done.is_set():
                        woke_another = True
                        break
                if not woke_another:
                    break  # done, or nothing came in time: sleep on the interrupt (letting go re-checks)
                await trio.lowlevel.checkpoint()  # the task we woke runs; we poll again after it
        finally:
            for p in self.group():
                p.let_go(batch)
        await batch.done.wait()

    async def run(self) -> None:
        """The interrupt task: reap whenever the queue's interrupt fires
        (``drain``), until the channel goes away (the caller catches that)."""
        while True:
            await drain(self.channel, self.reap)
