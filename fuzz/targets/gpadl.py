"""GPADLs: header and body assembly, teardown, and rings opened on them.

Where the control target mutates bytes, this one mutates meaning: after
contact and offers, an input is a sequence of GPADL headers (declared
length, byte count and offset, first PFNs), bodies, teardowns, opens with
a ring split, closes, rescind releases and unloads, with PFNs drawn near
the interesting edges (0, the end of guest RAM, far beyond it).

Invariants, checked against a model of what the guest sent: a GPADL the
server lists as created holds exactly the PFNs the guest sent for it, in
order, every one inside guest RAM, with the byte count and offset of its
header; GPADL_CREATED with success comes once per created GPADL; the
server never holds more than its cap; the host writes guest RAM only in
the SynIC areas and inside the ring GPADLs of open channels; statuses and
host messages are well-formed; no descriptor is left open.
"""

from __future__ import annotations

import trio
import trio.testing

import host_drivers.echo  # noqa: F401 - imported here so it is instrumented
from fuzz.rig import Input, Machine, Script, changed_ranges, check, inside, no_fd_left_open, run
from fuzz.targets.control import check_server
from fuzz.targets.hypercall import synic_areas
from pvbus.devices import ECHO
from vmbus import hv
from vmbus import protocol as P
from vmbus.guest_memory import PAGE_SIZE

RAM_PAGES = 64
CONN = hv.VMBUS_MESSAGE_CONNECTION_ID_4
HEADER, BODY, TEARDOWN, OPEN, CLOSE, RELEASE, UNLOAD = range(7)
MAX_OPS = 40


def pfn(inp: Input) -> int:
    """A page number: mostly inside RAM, often at its edges, sometimes anywhere."""
    v = inp.u8()
    if v < 0xC0:
        return v % RAM_PAGES
    if v < 0xF0:
        return RAM_PAGES - 0xC0 + v  # the last pages and the first beyond
    return inp.u64()


def pfns(inp: Input, limit: int) -> tuple[int, ...]:
    count = inp.u8() % (limit + 1)
    if inp.u8() & 1:  # a contiguous run, as rings need
        first = pfn(inp)
        return tuple((first + i) % (1 << 64) for i in range(count))
    return tuple(pfn(inp) for _ in range(count))


def operation(inp: Input) -> P.Message:
    op = inp.u8() % 7
    relid, gid = inp.u8() % 4, inp.u8() % 8
    if op == HEADER:
        total = inp.u16() % 300
        offset, count = inp.u16() % (PAGE_SIZE + 2), inp.u32()
        if inp.u8() & 1:  # a byte count that agrees with the page count
            count = max(0, total * PAGE_SIZE - offset - inp.u8())
        return P.GpadlHeader(relid, gid, 8 + 8 * total, 1, count, offset, pfns(inp, P.GPADL_HEADER_PFNS))
    if op == BODY:
        return P.GpadlBody(inp.u32(), gid, pfns(inp, P.GPADL_BODY_PFNS))
    if op == TEARDOWN:
        return P.GpadlTeardown(relid, gid)
    if op == OPEN:
        return P.OpenChannel(relid, inp.u32(), gid, 0, inp.u8())
    if op == CLOSE:
        return P.CloseChannel(relid)
    if op == RELEASE:
        return P.RelidReleased(relid)
    return P.Unload()


class Model:
    """What the guest sent for each GPADL id it is assembling or holds."""

    def __init__(self) -> None:
        self.sent: dict[int, list[int]] = {}
        self.header: dict[int, P.GpadlHeader] = {}

    def posted(self, msg: P.Message, status: int) -> None:
        if status != hv.HvStatus.SUCCESS:
            return
        msg = P.decode(msg.encode())  # what the host saw: a header keeps only its declared PFNs
        if isinstance(msg, P.GpadlHeader):
            self.sent[msg.gpadl] = list(msg.pfns)
            self.header[msg.gpadl] = msg
        elif isinstance(msg, P.GpadlBody):
            self.sent[msg.gpadl] += msg.pfns

    def check(self, server) -> None:  # noqa: ANN001 - a VmbusServer
        for gid, g in {**server.assembling, **server.gpadls}.items():
            check(gid in self.sent, f"server holds GPADL {gid:#x} the guest never started")
            check(list(g.pfns) == self.sent[gid], f"GPADL {gid:#x} pages {g.pfns} differ from what was sent")
            h = self.header[gid]
            check((g.byte_count, g.byte_offset, g.relid) == (h.byte_count, h.byte_offset, h.child_relid),
                  f"GPADL {gid:#x} range differs from its header")


def ring_areas(machine: Machine) -> list[tuple[int, int]]:
    server = machine.server
    assert server is not None
    out = []
    for ch in server.channels.values():
        if ch.ring_gpadl is not None and ch.ring_gpadl in server.gpadls:
            g = server.gpadls[ch.ring_gpadl]
            out += [(p * PAGE_SIZE, (p + 1) * PAGE_SIZE) for p in g.pfns]
    return out


async def drive(ops: list[P.Message]) -> None:
    machine = Machine(RAM_PAGES)
    model = Model()
    created: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            server = machine.start_bus(nursery, [ECHO, ECHO])
            await machine.enable_synic()
            await machine.post(CONN, P.InitiateContact(P.Version.WIN10_V5_3, 0, hv.VMBUS_MESSAGE_SINT).encode())
            await machine.post(CONN, P.RequestOffers().encode())
            await machine.drain_messages()
            for msg in ops:
                areas = synic_areas(machine) + ring_areas(machine)
                before = bytes(machine.ram.buf)
                status = await machine.post(CONN, msg.encode())
                model.posted(msg, status)
                for raw in await machine.drain_messages():
                    reply = P.decode(raw)
                    if isinstance(reply, P.GpadlCreated) and reply.creation_status == P.STATUS_SUCCESS:
                        check(reply.gpadl in server.gpadls, f"GPADL {reply.gpadl:#x} reported created, not held")
                        created.append(reply.gpadl)
                await trio.testing.wait_all_tasks_blocked()  # let channel workers run on their rings
                areas += synic_areas(machine) + ring_areas(machine)
                changed = changed_ranges(before, machine.ram.buf)
                check(inside(changed, areas), f"host wrote guest RAM at {changed} outside {areas}")
                check_server(server, RAM_PAGES)
                model.check(server)
            check(not machine.partition.rejected.get("device"), "a device failed on guest input")
            nursery.cancel_scope.cancel()
    finally:
        await machine.close()


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    ops = []
    while inp.left and len(ops) < MAX_OPS:
        ops.append(operation(inp))
    with no_fd_left_open():
        run(drive, ops)


def _run(s: Script, first: int, count: int) -> None:
    s.u8(count).u8(1).u8(first)


def seeds() -> list[bytes]:
    """A 40-page ring GPADL in a header and a body, opened, closed, torn
    down; a scattered 3-page GPADL; a body for nothing."""
    s = Script()
    s.u8(HEADER).u8(1).u8(3).u16(40).u16(0).u32(0).u8(1).u8(0)
    _run(s, 8, P.GPADL_HEADER_PFNS)
    s.u8(BODY).u8(1).u8(3).u32(0)
    _run(s, 8 + P.GPADL_HEADER_PFNS, 40 - P.GPADL_HEADER_PFNS)
    s.u8(OPEN).u8(1).u8(3).u32(1).u8(20)
    s.u8(CLOSE).u8(1).u8(3)
    s.u8(TEARDOWN).u8(1).u8(3)
    scattered = Script().u8(HEADER).u8(2).u8(5).u16(3).u16(100).u32(3 * PAGE_SIZE - 200).u8(0)
    scattered.u8(3).u8(0).u8(60).u8(2).u8(33)
    stray = Script().u8(BODY).u8(0).u8(6).u32(0).u8(2).u8(0).u8(1).u8(2)
    return [s.data(), scattered.data(), stray.data()]
