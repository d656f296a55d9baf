"""VMBus control messages: ``protocol.decode`` and the host's ``VmbusServer``.

An input is a sequence of messages a guest posts with HvPostMessage: the
connection id and the bytes of each come from the fuzzer (mostly a known
message type with fuzzed fields, sometimes raw bytes).  Each is decoded on
its own first, then posted through the partition to a bus serving an echo
and a storage device; the target reads the host's replies out of the
SynIC slot as the guest would.

Invariants: ``decode`` raises only ``ProtocolError``; a message it accepts
re-encodes to the bytes it came from (header padding zero, fixed-size
types exactly, GPADL messages up to their PFN list); every post is
answered with an HV_STATUS; the host only sends well-formed host-to-guest
messages; every GPADL the server holds names pages inside guest RAM and
is complete, and there are never more than the server's cap; tearing the
bus down leaves no descriptor open.
"""

from __future__ import annotations

import struct

import trio

import host_drivers.echo  # noqa: F401 - imported here so it is instrumented
import host_drivers.storage.device  # noqa: F401
from fuzz.rig import Input, Machine, ScratchDisk, Script, check, no_fd_left_open, run
from pvbus.devices import ECHO, STORAGE
from vmbus import hv
from vmbus import protocol as P
from vmbus import server as S

TYPES = sorted(P.MESSAGES)
CONN_IDS = (hv.VMBUS_MESSAGE_CONNECTION_ID, hv.VMBUS_MESSAGE_CONNECTION_ID_4, 0x2001, 0x2002)
MAX_MESSAGES = 32
RAM_PAGES = 64
DISK = ScratchDisk()


def check_decode(data: bytes) -> P.Message | None:
    """Decode one message and check it round-trips."""
    try:
        msg = P.decode(data)
    except P.ProtocolError:
        return None
    padding = struct.unpack_from("<I", data, 4)[0]
    if padding:
        return msg  # the padding is not kept, so it cannot come back
    again = msg.encode()
    if isinstance(msg, (P.GpadlHeader, P.GpadlBody)):
        check(data.startswith(again), f"{msg.TYPE.name} re-encodes to {again.hex()} from {data.hex()}")
    elif len(data) == type(msg).size():
        check(again == data, f"{msg.TYPE.name} re-encodes to {again.hex()} from {data.hex()}")
    else:
        check(data.startswith(again), f"{msg.TYPE.name} with a tail re-encodes to {again.hex()}")
    return msg


def one_message(inp: Input) -> tuple[int, bytes]:
    """Connection id (one of the known ones, or any), then a message: a
    known type with its fixed body and a tail, or raw bytes (high bit)."""
    how = inp.u8()
    conn = CONN_IDS[how % len(CONN_IDS)] if how < 0x80 else inp.u32()
    kind = inp.u8()
    if kind >= 0x80:
        return conn, inp.blob(P.MAX_MESSAGE_SIZE + 8)
    cls = P.MESSAGES[TYPES[kind % len(TYPES)]]
    return conn, P.HEADER.pack(cls.TYPE, 0) + inp.take(cls.BODY.size).ljust(cls.BODY.size, b"\0") + inp.blob(
        P.MAX_MESSAGE_SIZE - cls.size())


def write_message(script: Script, conn: int, msg: P.Message) -> None:
    raw = msg.encode()
    script.u8(CONN_IDS.index(conn)).u8(TYPES.index(msg.TYPE)).raw(raw[P.HEADER.size : msg.size()])
    script.blob(raw[msg.size() :])


def check_server(server: S.VmbusServer, pages: int) -> None:
    check(len(server.gpadls) + len(server.assembling) <= S.MAX_GPADLS, "more GPADLs than the cap")
    for g in server.gpadls.values():
        check(g.complete, f"GPADL {g.gpadl_id:#x} listed before it was complete")
        check(all(0 <= pfn < pages for pfn in g.pfns), f"GPADL {g.gpadl_id:#x} names a page outside RAM")
    for g in server.assembling.values():
        check(len(g.pfns) < g.total, f"GPADL {g.gpadl_id:#x} assembling past its length")
        check(all(0 <= pfn < pages for pfn in g.pfns), f"GPADL {g.gpadl_id:#x} names a page outside RAM")


async def drive(messages: list[tuple[int, bytes]]) -> None:
    machine = Machine(RAM_PAGES)
    try:
        async with trio.open_nursery() as nursery:
            server = machine.start_bus(nursery, [ECHO, STORAGE],
                                       {"storage": {"path": str(DISK.path), "fast_path": False}})
            await machine.enable_synic()
            for conn, data in messages:
                await machine.post(conn, data)  # the status is checked by Machine.exit
                await machine.drain_messages()
                check_server(server, RAM_PAGES)
            check(not machine.partition.rejected.get("device"), "a device failed on guest input")
            nursery.cancel_scope.cancel()
    finally:
        await machine.close()


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    messages = []
    while inp.left and len(messages) < MAX_MESSAGES:
        messages.append(one_message(inp))
    for _, msg in messages:
        check_decode(msg)
    with no_fd_left_open():
        run(drive, messages)


def seeds() -> list[bytes]:
    """A guest's boot conversation: contact, offers, a GPADL in several
    messages, open, close, teardown, unload (and an old-style contact)."""
    relid, gid = 1, 7
    script: list[P.Message] = [P.InitiateContact(P.Version.WIN10_V5_3, 0, hv.VMBUS_MESSAGE_SINT), P.RequestOffers()]
    script += P.gpadl_messages(relid, gid, list(range(8, 8 + 40)), 40 * 4096)
    script += [P.OpenChannel(relid, 1, gid, 0, 20), P.CloseChannel(relid), P.GpadlTeardown(relid, gid),
               P.RelidReleased(relid), P.Unload()]
    out = []
    for n in (1, 2, len(script)):
        s = Script()
        for m in script[:n]:
            write_message(s, hv.VMBUS_MESSAGE_CONNECTION_ID_4, m)  # 4 before and after contact at 5.x
        out.append(s.data())
    s = Script()
    for m in (P.InitiateContact(P.Version.WIN8_1), P.RequestOffers(), P.Unload()):
        write_message(s, hv.VMBUS_MESSAGE_CONNECTION_ID, m)
    out.append(s.data())
    return out
