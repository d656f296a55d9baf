"""The admin protocol: what ``pvbus inspect`` and the tests say to a running host.

A client connects to ``<socket>.admin`` (AF_UNIX stream), sends one request,
a JSON object on one line of at most ``MAX_LINE`` bytes, reads one JSON
object line back, and the host closes the connection.  Requests:

====================================================  =====================================
``{"cmd": "inspect"}``                                 partitions, channels, rings, counters
``{"cmd": "rescind", "partition": P, "relid": R}``     hot-remove one channel of one guest
``{"cmd": "wait", "partitions": N, "timeout": S}``     answer once exactly N guests are
                                                       connected (``timeout`` optional, 30 s)
``{"cmd": "device", "partition": P, "device": D,``     run command C of device D of one guest
``"command": C, "args": {...}}``                       (``pvbus shutdown``, ``pvbus kvp``); ``args``
                                                       optional, a flat object the device checks
====================================================  =====================================

Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": "<one line>"}``.

Whoever may reach the guest socket may reach this one, so every request is
hostile until parsed.  The protocol comes in layers, each usable on its own
(fuzz targets drive the first two without a host or a socket):

- ``parse_request(line)``: bytes to one of the request dataclasses, or
  ``AdminError`` naming what is wrong.  Pure.  Exactly the shapes above: a
  JSON object, no unknown or duplicate keys, integers that are integers
  (not floats, not booleans) within their ranges, a finite timeout.
- ``dispatch(request, host)``: runs a parsed request against anything with
  the ``AdminHost`` methods and returns the answer; it never raises (bar
  cancellation): whatever the host raises becomes an error answer.
- ``serve_connection(stream, host)``: one connection, bounded in bytes and
  time; a client that hangs up at any point costs a closed socket, nothing
  more.  After its answer the host half-closes and reads the client's
  leftovers for a moment (bounded), as a web server's lingering close does,
  so a refused oversized request still gets its error line.
- ``serve(listener, host, admits)``: the accept loop, at most
  ``MAX_CONNECTIONS`` connections at once; past that, clients wait in the
  listen backlog for a free slot.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)

MAX_LINE = 4096  # a valid request is under 100 bytes
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request
ANSWER_TIMEOUT = 10.0  # seconds a client has to take its answer
LINGER_TIME = 1.0  # after answering, how long (and how many bytes) we read a
LINGER_BYTES = 1 << 20  # client's leftovers, so closing does not reset the answer away
CONNECT_TIMEOUT = 30.0  # a client waits this long for room in a busy host's backlog
DEFAULT_WAIT = 30.0
MAX_WAIT = 600.0
MAX_PARTITION_ID = (1 << 31) - 1
MAX_RELID = 0xFFF  # a relid is the low 12 bits of its connection id
MAX_PARTITIONS = 1 << 16
MAX_NAME = 64  # a device or device command name


class AdminError(ValueError):
    """A request refused: malformed, out of range, or naming nothing that exists."""


@dataclass(frozen=True)
class Inspect:
    pass


@dataclass(frozen=True)
class Rescind:
    partition: int
    relid: int


@dataclass(frozen=True)
class Wait:
    partitions: int
    timeout: float = DEFAULT_WAIT


@dataclass(frozen=True)
class DeviceCommand:
    partition: int
    device: str
    command: str
    args: dict[str, Any]


AdminRequest = Inspect | Rescind | Wait | DeviceCommand


class AdminHost(Protocol):
    """What the admin protocol needs from a host (``vmbus.host.HostService``)."""

    def inspect(self) -> dict[str, Any]: ...

    def rescind(self, partition: int, relid: int) -> None:
        """Hot-remove a channel; ``AdminError`` when the partition or relid is unknown."""

    async def wait_partitions(self, count: int, timeout: float) -> dict[str, Any]: ...

    async def device_command(self, partition: int, device: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """A device's own command (``HostDevice.admin``); ``AdminError`` when it refuses."""


# -- parsing -------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise AdminError(f"{name} is not a number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise AdminError(f"key {key!r} given twice")
        out[key] = value
    return out


def _integer(fields: dict[str, Any], key: str, low: int, high: int) -> int:
    if key not in fields:
        raise AdminError(f"{key!r} is missing")
    value = fields[key]
    if type(value) is not int or not low <= value <= high:  # bool is an int subclass: refused too
        raise AdminError(f"{key!r} must be an integer from {low} to {high}")
    return value


def _seconds(fields: dict[str, Any], key: str, default: float, high: float) -> float:
    value = fields.get(key, default)
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= high:
        raise AdminError(f"{key!r} must be a number of seconds from 0 to {high:g}")
    return float(value)


def _name(fields: dict[str, Any], key: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME \
            or not all(c.isascii() and (c.isalnum() or c in "_-") for c in value):
        raise AdminError(f"{key!r} must be a name of 1 to {MAX_NAME} letters, digits, '_' or '-'")
    return value


def _flat_object(fields: dict[str, Any], key: str) -> dict[str, Any]:
    value = fields.get(key, {})
    if not isinstance(value, dict) or not all(type(v) in (str, int, bool) for v in value.values()):
        raise AdminError(f"{key!r} must be an object of strings, integers and booleans")
    return value


_FIELDS: dict[str, frozenset[str]] = {
    "inspect": frozenset({"cmd"}),
    "rescind": frozenset({"cmd", "partition", "relid"}),
    "wait": frozenset({"cmd", "partitions", "timeout"}),
    "device": frozenset({"cmd", "partition", "device", "command", "args"}),
}


def parse_request(line: bytes) -> AdminRequest:
    """One request line (its trailing newline optional) to a request, or ``AdminError``."""
    if len(line) > MAX_LINE:
        raise AdminError(f"request longer than {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
        fields = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except AdminError:
        raise
    except UnicodeDecodeError:
        raise AdminError("request is not UTF-8") from None
    except RecursionError:
        raise AdminError("request nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer with too many digits
        raise AdminError(f"request is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise AdminError(f"request must be a JSON object, not {type(fields).__name__}")
    cmd = fields.get("cmd")
    if not isinstance(cmd, str) or cmd not in _FIELDS:
        raise AdminError(f"'cmd' must be one of {', '.join(sorted(_FIELDS))}")
    unknown = set(fields) - _FIELDS[cmd]
    if unknown:
        raise AdminError(f"unknown key(s) for {cmd}: {', '.join(sorted(map(repr, unknown)))}")
    if cmd == "inspect":
        return Inspect()
    if cmd == "rescind":
        return Rescind(_integer(fields, "partition", 1, MAX_PARTITION_ID), _integer(fields, "relid", 1, MAX_RELID))
    if cmd == "device":
        return DeviceCommand(_integer(fields, "partition", 1, MAX_PARTITION_ID), _name(fields, "device"),
                             _name(fields, "command"), _flat_object(fields, "args"))
    return Wait(_integer(fields, "partitions", 0, MAX_PARTITIONS), _seconds(fields, "timeout", DEFAULT_WAIT, MAX_WAIT))


# -- answering -------------------------------------------------------------------


def _error(why: str) -> dict[str, Any]:
    return {"ok": False, "error": why}


async def dispatch(request: AdminRequest, host: AdminHost) -> dict[str, Any]:
    """Run one parsed request; every failure becomes an error answer."""
    try:
        if isinstance(request, Inspect):
            return {"ok": True, **host.inspect()}
        if isinstance(request, Rescind):
            host.rescind(request.partition, request.relid)
            return {"ok": True}
        if isinstance(request, DeviceCommand):
            return {"ok": True, **await host.device_command(request.partition, request.device, request.command,
                                                            request.args)}
        return await host.wait_partitions(request.partitions, request.timeout)
    except AdminError as exc:
        return _error(str(exc))
    except Exception as exc:  # noqa: BLE001 - an admin request must never take the host down
        log.warning("admin: %s failed: %r", type(request).__name__.lower(), exc)
        log.debug("admin request %r", request, exc_info=True)
        return _error(f"internal error: {exc!r}")


def encode_answer(answer: dict[str, Any]) -> bytes:
    """An answer as its line; one that does not encode becomes an error line."""
    try:
        return json.dumps(answer, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        return json.dumps(_error(f"answer not encodable: {exc}")).encode() + b"\n"


async def answer_line(line: bytes, host: AdminHost) -> bytes:
    """A request line to its answer line: parse, dispatch, encode."""
    try:
        request = parse_request(line)
    except AdminError as exc:
        return encode_answer(_error(str(exc)))
    return encode_answer(await dispatch(request, host))


# -- connections ---------------------------------------------------------------------


async def _read_request(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The first line (or everything before end of stream); ``None`` if the
    client sent nothing.  Raises ``AdminError`` past ``MAX_LINE`` bytes."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(MAX_LINE + 1 - len(buf))
        if not chunk:
            return bytes(buf) if buf else None
        buf += chunk
        if len(buf) > MAX_LINE and b"\n" not in buf:
            raise AdminError(f"request longer than {MAX_LINE} bytes")
    return bytes(buf[: buf.index(b"\n")])


async def _linger(stream: trio.abc.Stream) -> None:
    """Close gently: say we are done, then read and drop what the client still
    sends (bounded).  Closing a Unix stream socket with unread data resets it,
    and the client would get ECONNRESET instead of the answer it was sent."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    dropped = 0
    with trio.move_on_after(LINGER_TIME):
        while dropped < LINGER_BYTES:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            dropped += len(chunk)


async def serve_connection(stream: trio.abc.Stream, host: AdminHost) -> None:
    """One admin connection: a request in, an answer out, closed.  Never raises
    (bar cancellation): a slow, oversized or vanished client just ends it."""
    try:
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    line = await _read_request(stream)
                if line is None:
                    return
                answer = await answer_line(line, host)
            except AdminError as exc:
                answer = encode_answer(_error(str(exc)))
            except trio.TooSlowError:
                answer = encode_answer(_error(f"no request within {REQUEST_TIMEOUT:g} s"))
            with trio.move_on_after(ANSWER_TIMEOUT):
                await stream.send_all(answer)
                await _linger(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("admin: client went away: %s", exc)


async def serve(
    listener: trio.socket.SocketType,
    host: AdminHost,
    admits: Callable[[trio.socket.SocketType], bool],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept admin connections until cancelled, at most ``MAX_CONNECTIONS``
    at once: past that, clients wait in the listen backlog (the kernel's
    memory, not ours) until one ends.  ``admits`` decides who may use the
    socket (it logs its refusals); a refused peer is just closed."""
    slots = trio.Semaphore(MAX_CONNECTIONS)

    async def one(conn: trio.socket.SocketType) -> None:
        try:
            await serve_connection(trio.SocketStream(conn), host)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                conn, _ = await listener.accept()
            except OSError as exc:  # out of fds, say: wait a little rather than spin or die
                slots.release()
                log.warning("admin: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            if not admits(conn):
                conn.close()
                slots.release()
                continue
            nursery.start_soon(one, conn)


async def _connect(path: str) -> trio.socket.SocketType:
    """Connect, waiting for room in a busy host's backlog: a Unix socket's
    non-blocking connect fails with EAGAIN there (and trio's would go on to
    ENOTCONN at first use), so retry it until ``CONNECT_TIMEOUT``."""
    with trio.fail_after(CONNECT_TIMEOUT):
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
                return trio.socket.from_stdlib_socket(sock)
            except BlockingIOError:
                sock.close()
                await trio.sleep(0.05)
            except BaseException:
                sock.close()
                raise


async def admin_request(socket_path: str | os.PathLike[str], request: dict[str, Any]) -> dict[str, Any]:
    """Send one admin request to the host serving ``socket_path`` and return its answer."""
    stream = trio.SocketStream(await _connect(f"{os.fspath(socket_path)}.admin"))
    async with stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError(f"the host at {os.fspath(socket_path)} closed the admin connection without an answer")
    answer: dict[str, Any] = json.loads(buf)
    return answer
