"""A host stopped by a signal tells its guests before it goes, with real
processes and real signals.

- a guest speaking the protocol by hand sees a RESCINDCHANNELOFFER for every
  channel it was offered, then its control socket close, and the host exits 0;
- a real guest sitting idle on an open channel is told too: the host exits 0
  and the guest exits non-zero with one line, not a hang and not a traceback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from vmbus import protocol as P
from vmbus.errors import VmbusError

from ..bus.harness import RawGuest, guest_command
from ..hostile.processes import logged_host

DEADLINE = 30  # generous: the host's grace period is a couple of seconds


def _wait_in_thread(proc: subprocess.Popen[bytes]) -> threading.Thread:
    t = threading.Thread(target=proc.wait, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_host_rescinds_every_channel_then_closes(tmp_path: Path, sig: signal.Signals) -> None:
    with logged_host(tmp_path, "--device", "echo") as host:

        async def main() -> None:
            guest = RawGuest()
            try:
                async with trio.open_nursery() as nursery:
                    await guest.connect(host.socket, nursery)
                    await guest.contact()
                    assert await guest.post(P.RequestOffers()) == 0
                    await guest.expect(P.AllOffersDelivered)
                    offered = {m.child_relid for m in guest.messages if isinstance(m, P.OfferChannel)}
                    assert offered
                    host.proc.send_signal(sig)
                    rescinded: set[int] = set()
                    with trio.fail_after(DEADLINE):
                        while rescinded != offered:
                            msg = await guest.expect(P.RescindChannelOffer, timeout=DEADLINE)
                            rescinded.add(msg.child_relid)
                    # The host closes the control socket once it has told us: every exit fails.
                    with trio.fail_after(DEADLINE):
                        while True:
                            try:
                                await guest.post(P.RequestOffers())
                            except (VmbusError, OSError, trio.BrokenResourceError):
                                break
                            await trio.sleep(0.1)
                    nursery.cancel_scope.cancel()
            finally:
                guest.close()

        trio.run(main)
        assert host.proc.wait(timeout=DEADLINE) == 0
        assert "Traceback" not in host.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_host_ends_an_idle_guest_with_one_line(tmp_path: Path, sig: signal.Signals) -> None:
    with logged_host(tmp_path, "--device", "echo") as host:
        guest = subprocess.Popen(guest_command(host, "idle"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert guest.stdout is not None
            booted = json.loads(guest.stdout.readline())
            assert booted["booted"] and booted["devices"]["echo"] == "open"
            assert host.stop(sig) == 0
            try:
                _, err = guest.communicate(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the guest did not notice its host had gone within {DEADLINE} s") from None
        finally:
            if guest.poll() is None:
                guest.kill()
                guest.wait()
        assert guest.returncode not in (0, None)
        lines = [x for x in err.decode().splitlines() if x.strip()]
        assert len(lines) == 1 and "Traceback" not in err.decode(), err.decode()
        assert "Traceback" not in host.log()
