"""Guest programs for the sockets tests (``--program tests.sockets.guest_programs:NAME``).

Each prints JSON lines the test reads.  Data are deterministic per
connection (``block``) so both ends can check them by SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import h11
import trio

from vmbus.protocols import hvsock


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def block(seed: int) -> bytes:
    """64 KiB that differ for every seed; a connection's data is this block repeated."""
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(2048))


def digest_of(seed: int, size: int) -> str:
    """SHA-256 of ``size`` bytes (a multiple of 64 KiB) of seed's data."""
    h, chunk = hashlib.sha256(), block(seed)
    for _ in range(size // len(chunk)):
        h.update(chunk)
    return h.hexdigest()


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    parts = []
    while data := await stream.receive_some(1 << 16):
        parts.append(data)
    return b"".join(parts)


async def http_get(kernel: Any, argv: list[str]) -> int:
    """GET argv[1] from the host service behind port argv[0], with h11."""
    stream = await kernel.device("sockets").connect(int(argv[0]))
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(method="GET", target=argv[1], headers=[("Host", "guest")])))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    body, status = b"", 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some())
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    await stream.aclose()
    say(status=status, length=len(body), sha256=hashlib.sha256(body).hexdigest())
    return 0


async def bulk(kernel: Any, argv: list[str]) -> int:
    """argv: port, connections, bytes each (a multiple of 64 KiB).  Each
    connection sends ``seed size\n`` and its data, half-closes, and checks
    what the host sends back: seed + 1000's data of the same size, then a
    line with the SHA-256 and count of what the host received."""
    port, count, size = int(argv[0]), int(argv[1]), int(argv[2])
    sockets = kernel.device("sockets")
    results: list[dict[str, Any]] = []

    async def one(seed: int) -> None:
        stream = await sockets.connect(port)
        chunk = block(seed)

        async def send() -> None:
            await stream.send_all(f"{seed} {size}\n".encode())
            for _ in range(size // len(chunk)):
                await stream.send_all(chunk)
            await stream.send_eof()

        received, tail, h = 0, b"", hashlib.sha256()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while data := await stream.receive_some(1 << 16):
                take = max(0, min(len(data), size - received))
                h.update(data[:take])
                received += take
                tail += data[take:]
        await stream.aclose()
        digest, got = tail.decode().split()
        results.append({"seed": seed, "host_saw_ok": digest == digest_of(seed, size) and int(got) == size,
                        "back_ok": received == size and h.hexdigest() == digest_of(seed + 1000, size)})

    async with trio.open_nursery() as nursery:
        for seed in range(count):
            nursery.start_soon(one, seed)
    say(connections=len(results), all_ok=all(r["host_saw_ok"] and r["back_ok"] for r in results),
        bad=[r for r in results if not (r["host_saw_ok"] and r["back_ok"])])
    return 0


async def refused(kernel: Any, argv: list[str]) -> int:
    """Connect to a port nobody serves, then (still working) to one served."""
    sockets = kernel.device("sockets")
    try:
        await sockets.connect(int(argv[0]))
    except ConnectionRefusedError as exc:
        say(refused=True, message=str(exc))
    else:
        say(refused=False)
    for bad in ("not-a-port", str(hvsock.MAX_PORT + 1)):
        try:
            await sockets.connect(bad)
        except ValueError as exc:
            say(bad_address=bad, message=str(exc))
    stream = await sockets.connect(int(argv[1]))
    await stream.send_all(b"still here")
    await stream.send_eof()
    say(after_refusal=(await receive_all(stream)).decode())
    await stream.aclose()
    return 0


async def listen_upper(kernel: Any, argv: list[str]) -> int:
    """Listen on argv[0]; for argv[1] connections, answer the upper-cased
    input once the host half-closes, then close."""
    listener = kernel.device("sockets").listen(int(argv[0]))
    say(listening=True)
    for _ in range(int(argv[1])):
        stream = await listener.accept()
        data = await receive_all(stream)
        await stream.send_all(data.upper())
        await stream.aclose()
        say(served=len(data))
    await listener.aclose()
    return 0


async def stream_forever(kernel: Any, argv: list[str]) -> int:
    """Send to port argv[0] on argv[1] connections until killed; says
    ``streaming`` once every connection has sent."""
    sockets = kernel.device("sockets")
    chunk = block(0)
    count, started = int(argv[1]), 0
    all_started = trio.Event()

    async def one() -> None:
        nonlocal started
        stream = await sockets.connect(int(argv[0]))
        await stream.send_all(chunk)
        started += 1
        if started == count:
            all_started.set()
        while True:
            await stream.send_all(chunk)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
        await all_started.wait()
        say(streaming=True)
    return 0


async def hostile_pipe(kernel: Any, argv: list[str]) -> int:
    """Write pipe packets that break the rules straight into a connection's
    ring (one kind per connection), then check the device still serves."""
    from ring import PacketType

    sockets = kernel.device("sockets")
    bad_packets = {
        "length_past_packet": hvsock.PIPE_HEADER.pack(hvsock.PIPE_DATA, 4096) + b"x" * 16,
        "over_16k": hvsock.PIPE_HEADER.pack(hvsock.PIPE_DATA, 20000) + b"x" * 20000,
        "partial": hvsock.PIPE_HEADER.pack(hvsock.PIPE_PARTIAL, 4) + b"abcd",
        "gpa_direct_setup": hvsock.PIPE_HEADER.pack(3, 0),
    }
    outcome = {}
    for name, payload in bad_packets.items():
        stream = await sockets.connect(int(argv[0]))
        channel = stream.channel
        channel.outgoing.write(payload, packet_type=PacketType.DATA_INBAND)
        channel.commit_write()
        try:
            with trio.fail_after(20):
                data = await receive_all(stream)
            outcome[name] = f"eof after {len(data)} bytes"
        except trio.BrokenResourceError:
            outcome[name] = "reset"
    stream = await sockets.connect(int(argv[0]))
    await stream.send_all(b"fine")
    await stream.send_eof()
    say(outcome=outcome, after=(await receive_all(stream)).decode())
    return 0
