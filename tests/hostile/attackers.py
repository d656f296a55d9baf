"""Hostile guests as processes: ``python -m tests.hostile.attackers KIND SOCKET``.

Each puts one attack on the fds it shares with the host in place, prints one
JSON line ({"ready": true, ...}) and then holds it until its stdin closes:

- ``blocking-doorbell``: opens the echo channel, clears O_NONBLOCK on the
  channel eventfd the host handed it and rings it once (the host's next read
  of the empty counter would sleep);
- ``full-sint``: connects with a blocking SINT eventfd whose counter it set to
  the maximum, then asks for contact (the host's interrupt write would sleep);
- ``pipe-sint``: connects with a pipe as its SINT line; reports the status;
- ``lingering-socket``: passes the host an extra fd, a TCP socket with unsent
  data and SO_LINGER 30 s, and closes its own copy (the host's close of it
  would wait out the linger time).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

import trio

from guest_kernel.hypercalls import Hypercalls
from guest_kernel.memory import GuestRam
from vmbus import hv
from vmbus import protocol as P
from vmbus.errors import HypercallFailed
from vmbus.transport import CONNECT_BODY, KIND, STATUS, WRMSR_BODY, ExitKind, recv_msg, send_msg

from ..bus.harness import RawGuest
from .guests import open_channel

COUNTER_MAX = 0xFFFF_FFFF_FFFF_FFFE
LINGER_SECONDS = 30


def ready(**facts: object) -> None:
    print(json.dumps({"ready": True, **facts}), flush=True)


async def hold() -> None:
    """Until the test closes our stdin."""
    await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def blocking_doorbell(path: str) -> None:
    g = RawGuest()
    async with trio.open_nursery() as nursery:
        await g.connect(path, nursery)
        _, fd = await open_channel(g, "echo")
        os.set_blocking(fd, True)  # the flag lives on the open file the host reads too
        os.eventfd_write(fd, 1)
        ready(blocking=os.get_blocking(fd))
        await hold()
        nursery.cancel_scope.cancel()


async def full_sint(path: str) -> None:
    ram = GuestRam(16 << 20)
    sint = os.eventfd(0)  # blocking
    os.eventfd_write(sint, COUNTER_MAX)
    calls = await Hypercalls.connect(path, ram.fd, ram.size, sint)
    simp = ram.alloc(1) << 12
    await calls.wrmsr(hv.HV_X64_MSR_SIMP, simp | hv.MSR_ENABLE)
    ready(counter="max")
    async with trio.open_nursery() as nursery:
        # Answered at once by a host that never writes the SINT from its loop;
        # never by one that does (it sleeps in that write).
        nursery.start_soon(calls.post_message, 4, P.InitiateContact(P.Version.WIN10_V5_3, 0, 2, 0, 0).encode())
        await hold()
        nursery.cancel_scope.cancel()


async def pipe_sint(path: str) -> None:
    ram = GuestRam(16 << 20)
    r, w = os.pipe()
    try:
        await Hypercalls.connect(path, ram.fd, ram.size, w)
        status = int(hv.HvStatus.SUCCESS)
    except HypercallFailed as exc:
        status = int(exc.status)
    ready(status=status)
    await hold()
    os.close(r)


async def lingering_socket(path: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # never accepted, never read: the data cannot drain
    client = socket.create_connection(listener.getsockname())
    client.setblocking(False)
    unsent = 0
    try:
        while True:
            unsent += client.send(bytes(65536))
    except BlockingIOError:
        pass
    client.setblocking(True)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER_SECONDS))
    ram = GuestRam(16 << 20)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await sock.connect(path)
    # CONNECT, and at once an MSR write with the socket attached; our copy is
    # closed before the host has even answered CONNECT, so the host's copy is
    # the last reference and closing it runs the linger.
    await send_msg(sock, KIND.pack(ExitKind.CONNECT) + CONNECT_BODY.pack(ram.size),
                   [ram.fd, os.eventfd(0, os.EFD_NONBLOCK)])
    await send_msg(sock, KIND.pack(ExitKind.WRMSR) + WRMSR_BODY.pack(hv.HV_X64_MSR_EOM, 0), [client.fileno()])
    client.close()
    connected = STATUS.unpack((await recv_msg(sock))[0])[0]
    ready(unsent=unsent, connect=connected)
    async with trio.open_nursery() as nursery:
        async def reply() -> None:
            data, _ = await recv_msg(sock)
            print(json.dumps({"reply": STATUS.unpack(data)[0]}), flush=True)

        nursery.start_soon(reply)
        await hold()
        nursery.cancel_scope.cancel()
    listener.close()


ATTACKS = {
    "blocking-doorbell": blocking_doorbell,
    "full-sint": full_sint,
    "pipe-sint": pipe_sint,
    "lingering-socket": lingering_socket,
}

if __name__ == "__main__":
    trio.run(ATTACKS[sys.argv[1]], sys.argv[2])
