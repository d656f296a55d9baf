"""The admin protocol: ``vmbus.admin.parse_request`` and ``answer_line``.

An input is one request line: raw bytes, or (first byte odd) a JSON object
assembled from fuzzed keys and values (the known keys and commands, odd
numbers, nesting, duplicates), so the schema checks past ``json.loads``
are reached.  The line is answered by a real ``HostService`` (not
listening, no guests) on a clock that jumps, so a ``wait`` costs nothing.

Invariants: ``parse_request`` raises only ``AdminError``; what it accepts is
one of the three request shapes with every field in its documented range,
and parsing the request's canonical JSON gives the same request; the answer
is exactly one line holding a JSON object with a boolean ``ok`` and, when
not ok, a one-line ``error`` (or, for a ``wait`` that timed out, the count).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import trio.testing

from fuzz.rig import Input, Script, check, run
from pvbus.devices import ECHO
from vmbus import admin as A
from vmbus.host import HostService

KEYS = ("cmd", "partition", "partitions", "relid", "timeout", "x", "")
COMMANDS = ("inspect", "rescind", "wait", "Inspect", "", "inspect ")
NUMBERS = (0, 1, -1, 2, 0xFFF, 0x1000, (1 << 31) - 1, 1 << 31, 1 << 16, (1 << 16) + 1, 10**400, 599, 600, 601)
SPECIALS = ("1e400", "NaN", "-Infinity", "true", "null", "[]", "{}", "\"x\"", "1.5", "-0.0", "[[[[[[1]]]]]]")
HOST = HostService(Path("/nonexistent/pvbus-fuzz.sock"), [ECHO])


def value(inp: Input, depth: int = 0) -> str:
    kind = inp.u8() % 6
    if kind == 0:
        return json.dumps(COMMANDS[inp.u8() % len(COMMANDS)])
    if kind == 1:
        return str(NUMBERS[inp.u8() % len(NUMBERS)])
    if kind == 2:
        return SPECIALS[inp.u8() % len(SPECIALS)]
    if kind == 3:
        return repr(inp.u16() / max(1, inp.u8()))
    if kind == 4 and depth < 3:
        return request_object(inp, depth + 1)
    return "[" * (inp.u16() % 3000) + "]" * (inp.u16() % 3000)


def request_object(inp: Input, depth: int = 0) -> str:
    fields = [f"{json.dumps(KEYS[inp.u8() % len(KEYS)])}: {value(inp, depth)}" for _ in range(inp.u8() % 5)]
    return "{" + ", ".join(fields) + "}"


def line(inp: Input) -> bytes:
    if inp.u8() & 1:
        return request_object(inp).encode() + (b"\n" if inp.u8() & 1 else b"")
    return inp.take(A.MAX_LINE + 16)


def check_request(req: A.AdminRequest) -> None:
    if isinstance(req, A.Rescind):
        check(1 <= req.partition <= A.MAX_PARTITION_ID and 1 <= req.relid <= A.MAX_RELID, f"accepted {req}")
        canonical = {"cmd": "rescind", "partition": req.partition, "relid": req.relid}
    elif isinstance(req, A.Wait):
        check(0 <= req.partitions <= A.MAX_PARTITIONS and math.isfinite(req.timeout)
              and 0 <= req.timeout <= A.MAX_WAIT, f"accepted {req}")
        canonical = {"cmd": "wait", "partitions": req.partitions, "timeout": req.timeout}
    else:
        check(isinstance(req, A.Inspect), f"parse_request returned {req!r}")
        canonical = {"cmd": "inspect"}
    again = A.parse_request(json.dumps(canonical).encode())
    check(again == req, f"{req} re-parses as {again}")


async def answer(data: bytes) -> None:
    out = await A.answer_line(data, HOST)
    check(out.endswith(b"\n") and out.count(b"\n") == 1, f"answer is not one line: {out[:200]!r}")
    reply = json.loads(out)
    check(isinstance(reply, dict) and isinstance(reply.get("ok"), bool), f"answer {out[:200]!r}")
    if not reply["ok"] and "error" not in reply:  # a wait that timed out says how many guests there were
        check(type(reply.get("partitions")) is int, f"refusal without an error: {out[:200]!r}")
    elif not reply["ok"]:
        check(isinstance(reply["error"], str) and "\n" not in reply["error"], f"error answer {out[:200]!r}")


def test_one_input(data: bytes) -> None:
    request = line(Input(data))
    try:
        check_request(A.parse_request(request))
    except A.AdminError:
        pass
    run(answer, request, clock=trio.testing.MockClock(autojump_threshold=0))  # a wait's timeout passes at once


def seeds() -> list[bytes]:
    raw = [b'{"cmd": "inspect"}\n', b'{"cmd": "rescind", "partition": 1, "relid": 1}\n',
           b'{"cmd": "wait", "partitions": 0, "timeout": 0.5}\n', b'{"cmd": "wait", "partitions": 1}\n',
           b"[]", b'"x"', b"42", b'{"cmd": "wait", "partitions": 1e400}', b"[" * 2000 + b"]" * 2000]
    out = [Script().u8(0).raw(r).data() for r in raw]
    structured = Script().u8(1).u8(2).u8(0).u8(0).u8(1).u8(4).u8(1).u8(1).u8(1)
    out.append(structured.data())
    return out
