"""Lost wake-up stress: the queue layer across two processes, many requests.

A host process serves a ring pair with the C server (``pv_serve`` and the
built-in echo handler, publishing each answer on its own so that the guest
sees as many publish/unmask interleavings as possible) and signals the
guest's eventfd when a commit says so.  The guest (this process) runs
several trio tasks that submit batches of requests and wait for them with
the queue layer's ``Poller``: mask before publishing, poll briefly, let go
(the last holder unmasks and re-checks), sleep on the interrupt, which the
interrupt task (``drain``) serves.

A watchdog proves a lost wake-up rather than guessing one: when no request
has completed for ``stall`` seconds and, twice in a row, the guest's
completion ring holds answers while its interrupt is unmasked and nobody
polls, nothing will ever look at them.  ``broken=True`` runs the old
``let_go`` that re-checked only once (see ``OnceRecheckPoller``); it must be
caught, the real one must finish every request.

``python -m tests.queue.stress --requests 1000000 [--broken]`` is the long
run (``make stress``); the test suite runs a short one.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import trio

from ring import CONTROL_SIZE, Doorbell, IncomingRing, OutgoingRing, SharedMemory
from ring.queue import SERVE_STOPPED, EchoReaper, echo_server, stage_counted
from vmbus.channel import Batch, Channel, Requestor
from vmbus.errors import ChannelClosed, ChannelRevoked
from vmbus.queue import Poller

DATA_SIZE = 64 << 10
RING_BYTES = CONTROL_SIZE + DATA_SIZE
TASKS = 4
BATCH_MAX = 8
POLL_US = 10
POLL_OUTSTANDING_MAX = 24
JITTER_SHARE = 0.2  # of reaps
JITTER_US = 20
PACE_SPINS = 400  # host: up to ~20 us of work per answer


class OnceRecheckPoller(Poller):
    """The deliberately broken variant: the last holder re-checks once
    after unmasking and not again after its own reap (the bug a guest disk
    once had: one request in ~300k hung)."""

    def let_go(self, holder: object) -> None:
        if holder not in self._holders:
            return
        self._holders.discard(holder)
        if not self._holders and self.channel.active and self.channel.incoming.unmask():
            self.reap()


class EchoQueue(Requestor):
    """The guest half: counted requests staged in C, answers reaped in C."""

    def __init__(self, channel: Channel, *, broken: bool, seed: int) -> None:
        super().__init__(channel, capacity=TASKS * BATCH_MAX)
        self._reaper = EchoReaper(channel.incoming, TASKS * BATCH_MAX)
        poller = OnceRecheckPoller if broken else Poller
        # As a disk polls only while little is in flight: the phases without
        # polling are where a lost wake-up stays lost (nobody looks again).
        self.poller = poller(self, self.reap, POLL_US, wanted=lambda: self.outstanding <= POLL_OUTSTANDING_MAX)
        self.completed = 0
        self.wrong = 0
        self._jitter = random.Random(seed)

    def reap(self) -> int:
        got = self._reaper.reap()
        if got and self._jitter.random() < JITTER_SHARE:
            # A guest that is slow between taking answers and releasing them
            # (preempted, busy settling): the window in which the host
            # publishes without signalling, widened the same for both variants.
            until = time.perf_counter() + JITTER_US * 1e-6
            while time.perf_counter() < until:
                pass
        if got:
            self.channel.commit_read(len(got))
        for tid, word, ptype in got:
            if word != tid:
                self.wrong += 1
            if self.settle(tid, ptype, word):
                self.completed += 1
        return len(got)

    async def wait(self, batch: Batch) -> None:
        await self.poller.wait(batch)

    async def run(self) -> None:
        try:
            await self.poller.run()
        except (ChannelRevoked, ChannelClosed):
            self.fail_all()

    async def echo(self, count: int) -> list[int]:
        held: list[object] = []

        async def send(tids: list[int]) -> None:
            batch = self._slots[tids[0] - 1]
            held.append(batch)
            done = 0

            def stage() -> tuple[int, bool, int]:
                nonlocal done
                # consecutive slots are not guaranteed: one request per call
                n = stage_counted(self.channel.outgoing, tids[done], 1)
                done += n
                return n, done == len(tids), 64

            await self.poller.publish(batch, stage)

        try:
            return await self.transact(count, send)
        finally:
            for holder in held:
                self.poller.let_go(holder)


@dataclass
class Outcome:
    completed: int
    lost_wakeup: bool
    wrong: int
    seconds: float
    host: dict[str, int]


def host_main(fd: int, kick: int, signal: int) -> None:
    """The host process: serve until stopped (SIGTERM ends it)."""
    shm = SharedMemory.attach(fd, 2 * RING_BYTES)
    incoming = IncomingRing(shm.buf, 0, RING_BYTES)
    outgoing = OutgoingRing(shm.buf, RING_BYTES, RING_BYTES)
    server = echo_server(incoming, outgoing, kick, signal_fd=signal, spin_us=50, batch_max=1,
                         pace_spins=PACE_SPINS)
    while server.serve() != SERVE_STOPPED:
        pass


async def run_guest(requests: int, *, broken: bool, stall: float = 3.0, seed: int = 1) -> Outcome:
    shm = SharedMemory.create(2 * RING_BYTES, "pvbus-queue-stress")
    guest_out = OutgoingRing(shm.buf, 0, RING_BYTES, format=True)
    guest_in = IncomingRing(shm.buf, RING_BYTES, RING_BYTES, format=True)
    to_host, to_guest = Doorbell(), Doorbell()

    async def wait_interrupt() -> None:
        await to_guest.wait()

    channel = Channel(1, guest_out, guest_in, to_host.ring, wait_interrupt)
    queue = EchoQueue(channel, broken=broken, seed=seed)
    host = subprocess.Popen(
        [sys.executable, "-m", "tests.queue.stress", "--serve", str(shm.fd), str(to_host.fileno()),
         str(to_guest.fileno())],
        pass_fds=(shm.fd, to_host.fileno(), to_guest.fileno()),
    )
    rng = random.Random(seed)
    issued = 0
    lost = False
    start = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run)

            async def submitter() -> None:
                nonlocal issued
                while issued < requests:
                    n = min(rng.randint(1, BATCH_MAX), requests - issued)
                    issued += n
                    await queue.echo(n)

            async def watchdog() -> None:
                nonlocal lost
                seen, since, suspicious = -1, time.monotonic(), 0
                while True:
                    await trio.sleep(stall / 4)
                    if queue.completed != seen:
                        seen, since, suspicious = queue.completed, time.monotonic(), 0
                        continue
                    if time.monotonic() - since < stall:
                        continue
                    unmasked = int.from_bytes(bytes(shm.buf[RING_BYTES + 8 : RING_BYTES + 12]), "little") == 0
                    if unmasked and guest_in.available and queue.outstanding:
                        suspicious += 1
                        if suspicious >= 2:  # answers waiting, no interrupt coming, nobody polling
                            lost = True
                            nursery.cancel_scope.cancel()
                            return

            async with trio.open_nursery() as workers:
                workers.start_soon(watchdog)
                async with trio.open_nursery() as submitters:
                    for _ in range(TASKS):
                        submitters.start_soon(submitter)
                workers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    finally:
        host.terminate()
        host.wait(timeout=30)
        to_host.close()
        to_guest.close()
        shm.close()
    stats = {"rechecks": queue.poller.stats.rechecks, "polls_hit": queue.poller.stats.polls_hit,
             "wakeups": channel.stats.wakeups, "signals_sent": channel.stats.signals_sent}
    return Outcome(queue.completed, lost, queue.wrong, time.monotonic() - start, stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--broken", action="store_true", help="run the variant that re-checks only once")
    parser.add_argument("--serve", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        host_main(*args.serve)
        return 0
    outcome = trio.run(lambda: run_guest(args.requests, broken=args.broken))
    print(f"{'broken' if args.broken else 'real'} variant: {outcome.completed} of {args.requests} requests "
          f"in {outcome.seconds:.1f} s, lost wake-up: {'YES' if outcome.lost_wakeup else 'no'}, "
          f"wrong answers: {outcome.wrong}; {outcome.host}")
    ok = (outcome.lost_wakeup if args.broken else outcome.completed == args.requests and not outcome.lost_wakeup)
    return 0 if ok and not outcome.wrong else 1


if __name__ == "__main__":
    sys.exit(main())
