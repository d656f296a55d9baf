"""A process of short-lived guests: ``python -m tests.hostile.churn SOCKET LIVES SEED``.

Each life is one connection to the host that goes some random way into the
bus and then ends without any goodbye, as a crashing guest would: CONNECT
only, a refused CONNECT (a pipe for a SINT), contact, offers, a GPADL left
half-built, a channel opened (and its doorbell rung, an extra fd passed), a
storage channel opened with requests never answered.  The last life ends
with SIGKILL of the whole process in the middle of its stage.  Prints one
JSON line per life ({"life": i, "stage": name}).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys

import trio

from guest_kernel.hypercalls import Hypercalls
from guest_kernel.memory import GuestRam
from vmbus import hv
from vmbus import protocol as P
from vmbus.errors import HypercallFailed
from vmbus.transport import KIND, WRMSR_BODY, ExitKind

from ..bus.harness import RawGuest
from .guests import offer_of, open_channel

STAGES = ("connect", "bad-connect", "contact", "offers", "half-gpadl", "open-echo", "open-storage")


async def life(path: str, stage: str, rng: random.Random, die: bool) -> None:
    if stage == "bad-connect":
        ram = GuestRam(4 << 20)
        r, w = os.pipe()
        try:
            await Hypercalls.connect(path, ram.fd, ram.size, w)
        except HypercallFailed:
            pass
        for fd in (r, w):
            os.close(fd)
        ram.close()
        return
    g = RawGuest(8)
    async with trio.open_nursery() as nursery:
        await g.connect(path, nursery)
        if stage != "connect":
            await g.contact()
        if stage in ("offers", "half-gpadl"):
            assert await g.post(P.RequestOffers()) == hv.HvStatus.SUCCESS
            await g.expect(P.AllOffersDelivered)
        if stage == "half-gpadl":
            relid = offer_of(g, "echo").child_relid
            pfn = g.ram.alloc(64)
            msgs = P.gpadl_messages(relid, 0x55, list(range(pfn, pfn + 64)), 64 * 4096)
            for m in msgs[: rng.randrange(1, len(msgs))]:
                await g.post(m)
        if stage in ("open-echo", "open-storage"):
            _, fd = await open_channel(g, "echo" if stage == "open-echo" else "storage")
            os.eventfd_write(fd, 1)
            extra = os.eventfd(0)
            await g.hv.hypercall(0x1234, b"")  # an unknown call, then one carrying an fd nobody asked for
            await g.hv._exit("wrmsr", KIND.pack(ExitKind.WRMSR) + WRMSR_BODY.pack(hv.HV_X64_MSR_EOM, 0), [extra])
            os.close(extra)
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        nursery.cancel_scope.cancel()
    # no UNLOAD, no close of channels: the connection just ends
    g.hv.close()
    g.synic.close()
    g.ram.close()


async def main(path: str, lives: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(lives):
        stage = rng.choice(STAGES)
        print(json.dumps({"life": i, "stage": stage}), flush=True)
        with trio.fail_after(60):
            await life(path, stage, rng, die=i == lives - 1 and stage != "bad-connect")


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
