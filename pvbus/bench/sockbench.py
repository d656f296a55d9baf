"""``pvbus bench sockets``: a stream through the sockets device beside the
same stream over loopback TCP, in one run.

Three kinds of process take part, each its own Python interpreter, so no
two ends share a GIL:

- the **sink** (``python -m pvbus.bench.sockbench sink``): a trio server on
  127.0.0.1 with two listeners.  The stream listener reads a connection to
  its end, counting bytes and their CRC-32, and prints one JSON line per
  connection (bytes, CRC, seconds from the first byte to the FIN); the
  echo listener sends every fixed-size message straight back.
- the **native client** (``python -m pvbus.bench.sockbench native``): trio
  TCP streams to both listeners;
- a ``pvbus host`` whose sockets device forwards two guest ports to the
  sink's listeners, and a ``pvbus guest`` running ``guest_client``: the
  same client code over ``kernel.device("sockets").connect(port)``.  Its
  bytes cross the connection's ring, the host process, and then a
  loopback TCP hop to the sink (the device adds to loopback TCP, it does
  not replace it).

The client writes ``CHUNK`` (64 KiB) blocks of fixed data for a while and
sends the FIN; it reports how many it wrote, and the bench checks the
sink's count and CRC against that many blocks.  It then times small
request/response round trips (``MESSAGE`` bytes each way, each message
different and checked on return) into an HDR histogram.  Throughput is
what the sink saw; the ratio of the device's to loopback TCP's is the
issue's target (>= 0.5x at 64 KiB writes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
from hdrh.histogram import HdrHistogram

from ..errors import CommandError
from .tables import num, print_table, render_targets

CHUNK = 64 << 10
MESSAGE = 64  # bytes of one request and of its response
STREAM_PORT, ECHO_PORT = 5101, 5102  # the guest-visible ports of the sink's two listeners
TARGET_RATIO = 0.5


def block() -> bytes:
    """The 64 KiB every stream repeats: not periodic below 64 KiB, so a lost,
    doubled or reordered pipe packet changes the CRC."""
    return bytes((i * 7 + (i >> 8) * 13) & 0xFF for i in range(CHUNK))


def expected_crc(chunks: int) -> int:
    data, crc = block(), 0
    for _ in range(chunks):
        crc = zlib.crc32(data, crc)
    return crc


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# -- the client, natively or in a guest --------------------------------------------------------

Connect = Callable[[int], Awaitable[trio.abc.HalfCloseableStream]]


async def _stream(connect: Connect, port: int, seconds: float) -> int:
    """64 KiB writes for ``seconds``, then the FIN; the number written."""
    stream = await connect(port)
    data, chunks = block(), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await stream.send_all(data)
        chunks += 1
    await stream.send_eof()
    while await stream.receive_some(CHUNK):  # until the other end closes too
        pass
    await stream.aclose()
    return chunks


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    got = b""
    while len(got) < size:
        more = await stream.receive_some(size - len(got))
        if not more:
            raise trio.BrokenResourceError(f"the peer closed after {len(got)} of {size} bytes")
        got += more
    return got


async def _round_trips(connect: Connect, port: int, seconds: float) -> dict[str, Any]:
    """MESSAGE bytes there and back, one at a time, for ``seconds``."""
    stream = await connect(port)
    hist = HdrHistogram(1, 60_000_000_000, 3)  # nanoseconds
    mismatches = 0
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        message = count.to_bytes(8, "little") * (MESSAGE // 8)
        start = time.perf_counter_ns()
        await stream.send_all(message)
        answer = await _receive_exactly(stream, MESSAGE)
        hist.record_value(max(1, time.perf_counter_ns() - start))
        mismatches += answer != message
        count += 1
    await stream.aclose()
    return {"round_trips": count, "mismatches": mismatches, "p50_us": hist.get_value_at_percentile(50) / 1000,
            "p99_us": hist.get_value_at_percentile(99) / 1000, "mean_us": hist.get_mean_value() / 1000}


async def client(connect: Connect, stream_port: int, echo_port: int, stream_seconds: float,
                 rr_seconds: float) -> None:
    chunks = await _stream(connect, stream_port, stream_seconds)
    say(chunks=chunks, chunk=CHUNK, rr=await _round_trips(connect, echo_port, rr_seconds))


async def guest_client(kernel: Any, argv: list[str]) -> int:
    """Guest program: argv is stream seconds and round-trip seconds."""
    sockets = kernel.device("sockets")
    await client(sockets.connect, STREAM_PORT, ECHO_PORT, float(argv[0]), float(argv[1]))
    return 0


async def native_client(address: str, stream_port: int, echo_port: int, stream_seconds: float,
                        rr_seconds: float) -> None:
    async def connect(port: int) -> trio.SocketStream:
        return await trio.open_tcp_stream(address, port)  # TCP_NODELAY, as trio sets on every stream

    await client(connect, stream_port, echo_port, stream_seconds, rr_seconds)


# -- the sink ----------------------------------------------------------------------------------

async def _count(stream: trio.SocketStream) -> None:
    size = crc = 0
    first = last = 0.0
    async with stream:
        while data := await stream.receive_some(1 << 20):
            if not size:
                first = time.perf_counter()
            size += len(data)
            crc = zlib.crc32(data, crc)
        last = time.perf_counter()
    say(bytes=size, crc32=crc, seconds=last - first if size else 0.0)


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(MESSAGE):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def sink() -> None:
    counter = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    echo = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    say(stream_port=counter.socket.getsockname()[1], echo_port=echo.socket.getsockname()[1])
    with trio.open_signal_receiver(signal.SIGTERM) as stop:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, _count, [counter])
            nursery.start_soon(trio.serve_listeners, _echo, [echo])
            async for _ in stop:  # the bench is done with us
                nursery.cancel_scope.cancel()
                break


# -- the run -----------------------------------------------------------------------------------

PYTHON_M = [sys.executable, "-m"]


@contextmanager
def _process(argv: list[str], first_line: str, what: str) -> Iterator[subprocess.Popen[str]]:
    """A child process whose first line of output must contain ``first_line``;
    stopped with SIGTERM (then killed) at the end."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if first_line not in line:
            raise CommandError(f"the bench's {what} did not start (it said {line.strip()!r})")
        proc.first_line = line  # type: ignore[attr-defined]
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _client_result(argv: list[str], timeout: float, what: str) -> dict[str, Any]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise CommandError(f"the {what} failed: {done.stderr.strip()[-1500:]}")
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise CommandError(f"the {what} printed no result")
    return dict(lines[-1])


def _record(transport: str, sent: dict[str, Any], sink_line: str) -> dict[str, Any]:
    seen = json.loads(sink_line)
    sent_bytes = sent["chunks"] * sent["chunk"]
    crc = expected_crc(sent["chunks"])
    return {"transport": transport, "write_size": sent["chunk"], "bytes_sent": sent_bytes,
            "bytes_received": seen["bytes"], "crc32_sent": crc, "crc32_received": seen["crc32"],
            "data_ok": seen["bytes"] == sent_bytes and seen["crc32"] == crc,
            "stream_seconds": seen["seconds"],
            "mb_per_s": seen["bytes"] / seen["seconds"] / 1e6 if seen["seconds"] else 0.0,
            "rr": sent["rr"]}


def run(stream_seconds: float, rr_seconds: float, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    timeout = stream_seconds + rr_seconds + 120
    with _process([*PYTHON_M, "pvbus.bench.sockbench", "sink"], "stream_port", "sink") as sink_proc, \
            tempfile.TemporaryDirectory(prefix="pvbus-sockbench-") as tmp:
        assert sink_proc.stdout is not None
        ports = json.loads(sink_proc.first_line)  # type: ignore[attr-defined]
        progress("loopback TCP from a native trio client")
        native = _client_result([*PYTHON_M, "pvbus.bench.sockbench", "native", str(ports["stream_port"]),
                                 str(ports["echo_port"]), str(stream_seconds), str(rr_seconds)],
                                timeout, "native client")
        records = [_record("loopback-tcp", native, sink_proc.stdout.readline())]
        progress("the sockets device from a guest")
        services = f"{STREAM_PORT}=tcp:127.0.0.1:{ports['stream_port']};{ECHO_PORT}=tcp:127.0.0.1:{ports['echo_port']}"
        sock = os.path.join(tmp, "host.sock")
        with _process([*PYTHON_M, "pvbus", "host", "--socket", sock, "--device", f"sockets:services={services}"],
                      "ready", "host"):
            guest = _client_result([*PYTHON_M, "pvbus", "guest", "--socket", sock, "--ram", "64", "--program",
                                    "pvbus.bench.sockbench:guest_client", "--", str(stream_seconds),
                                    str(rr_seconds)], timeout, "guest")
            records.append(_record("sockets-device", guest, sink_proc.stdout.readline()))
    from .ringbench import machine_info

    return {"machine": machine_info(), "stream_seconds": stream_seconds, "rr_seconds": rr_seconds,
            "records": records, "targets": evaluate(records)}


def evaluate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["transport"]: r for r in records}
    dev, tcp = by.get("sockets-device"), by.get("loopback-tcp")
    if not (dev and tcp and tcp["mb_per_s"]):
        return []
    ratio = dev["mb_per_s"] / tcp["mb_per_s"]
    out = [{"target": f"stream at 64 KiB writes >= {TARGET_RATIO}x loopback TCP", "ratio": ratio,
            "met": ratio >= TARGET_RATIO, "detail": f"{num(dev['mb_per_s'])} vs {num(tcp['mb_per_s'])} MB/s"}]
    if tcp["rr"]["p50_us"]:
        rr = dev["rr"]["p50_us"] / tcp["rr"]["p50_us"]
        out.append({"target": "round-trip p50 (no target: device / loopback TCP)", "ratio": rr, "met": True,
                    "detail": f"{num(dev['rr']['p50_us'])} vs {num(tcp['rr']['p50_us'])} us"})
    return out


COLUMNS = ("transport", "MB/s", "MiB moved", "data", f"RR p50 us ({MESSAGE} B)", "RR p99 us", "round trips")
NUMERIC = (False, True, True, False, True, True, True)


def render(result: dict[str, Any], console: Any = None) -> None:
    rows = [[r["transport"], num(r["mb_per_s"]), num(r["bytes_received"] / (1 << 20)),
             "ok" if r["data_ok"] and not r["rr"]["mismatches"] else "BAD", num(r["rr"]["p50_us"]),
             num(r["rr"]["p99_us"]), num(r["rr"]["round_trips"])] for r in result["records"]]
    print_table("pvbus bench sockets: 64 KiB writes and small round trips, device vs loopback TCP",
                COLUMNS, rows, NUMERIC, console)
    render_targets(console, result["targets"])


def main(json_path: str | None, quick: bool) -> int:
    from rich.console import Console

    with Console(stderr=True).status("starting") as status:
        result = run(*((1.0, 0.5) if quick else (5.0, 3.0)), progress=status.update)
    render(result)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    bad = [r["transport"] for r in result["records"] if not r["data_ok"] or r["rr"]["mismatches"]]
    if bad:
        raise CommandError(f"data did not arrive intact over {', '.join(bad)}")
    return 0


def _child(argv: list[str]) -> None:
    """``sink`` or ``native STREAM_PORT ECHO_PORT STREAM_S RR_S`` (the bench starts these)."""
    if argv[0] == "sink":
        trio.run(sink)
    elif argv[0] == "native":
        trio.run(native_client, "127.0.0.1", int(argv[1]), int(argv[2]), float(argv[3]), float(argv[4]))


if __name__ == "__main__":
    _child(sys.argv[1:])
