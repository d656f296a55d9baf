"""Where a NIC's frames go on the host: a TAP interface, or a switch.

A backend has ``receive()`` (await a batch of frames for the guest),
``transmit(frames)`` (frames the guest sent; returns the bytes it took
and what it dropped, by reason) and ``close()``.  Both never block the host service:
a TAP is non-blocking and read only when the loop says it is readable; a
switch port's queue is bounded and a frame it cannot queue is dropped and
counted (the guest's TCP resends, the host keeps its memory).

- ``TapBackend``: a host TAP interface of the given name, optionally moved
  into a named network namespace and given an address (pyroute2, netlink),
  so the host's own stack, bridges and firewalls see the guest's frames.
- ``SwitchPort`` on a ``Switch``: an L2 learning switch inside the host
  service joining every guest NIC configured with the same switch name.
  It learns source MACs per port, forwards known unicast to one port and
  floods broadcast, multicast and unknown destinations to the others.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter, deque
from typing import Any

import trio

from vmbus.protocols.tap import open_tap, read_frames

log = logging.getLogger(__name__)
BATCH = 256  # frames taken from a backend at once
PORT_QUEUE = 1024  # frames a switch port holds for a guest that is not reading
LEARNED_MACS = 4096  # per switch: a guest cycling source MACs cannot grow it further


class TapBackend:
    def __init__(self, ifname: str, *, mtu: int, netns: str | None = None, address: str | None = None) -> None:
        self.fd, self.ifname = open_tap(ifname)
        self.netns = netns
        try:
            self._configure(mtu, address)
        except BaseException:
            os.close(self.fd)
            raise

    def _configure(self, mtu: int, address: str | None) -> None:
        from pyroute2 import IPRoute  # type: ignore[import-untyped]

        with IPRoute() as ip:
            (index,) = ip.link_lookup(ifname=self.ifname)
            ip.link("set", index=index, mtu=mtu)
            if self.netns:
                ip.link("set", index=index, net_ns_fd=self.netns)
        with IPRoute(netns=self.netns) if self.netns else IPRoute() as ip:
            (index,) = ip.link_lookup(ifname=self.ifname)
            if address:
                addr, _, prefix = address.partition("/")
                ip.addr("add", index=index, address=addr, prefixlen=int(prefix or 24))
            ip.link("set", index=index, state="up")

    async def receive(self) -> list[bytes]:
        while True:
            frames = read_frames(self.fd, BATCH)
            if frames:
                return frames
            await trio.lowlevel.wait_readable(self.fd)

    def transmit(self, frames: list[memoryview]) -> tuple[int, Counter[str]]:
        drops: Counter[str] = Counter()
        sent = 0
        for frame in frames:
            try:
                sent += os.write(self.fd, frame)
            except BlockingIOError:
                drops["tap_full"] += 1
            except OSError as exc:  # the interface is down (EIO), or the frame too big for it (EINVAL)
                drops["tap_" + (errno.errorcode.get(exc.errno or 0, "error")).lower()] += 1
        return sent, drops

    def describe(self) -> dict[str, Any]:
        return {"backend": "tap", "ifname": self.ifname, "netns": self.netns}

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)  # the interface goes with its last descriptor
            self.fd = -1


class Switch:
    """One named L2 learning switch of this host service."""

    registry: dict[str, Switch] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        self.ports: list[SwitchPort] = []
        self.table: dict[bytes, SwitchPort] = {}

    @classmethod
    def named(cls, name: str) -> Switch:
        if name not in cls.registry:
            cls.registry[name] = cls(name)
        return cls.registry[name]

    def attach(self) -> SwitchPort:
        port = SwitchPort(self)
        self.ports.append(port)
        return port

    def detach(self, port: SwitchPort) -> None:
        if port in self.ports:
            self.ports.remove(port)
        self.table = {mac: p for mac, p in self.table.items() if p is not port}
        if not self.ports:
            Switch.registry.pop(self.name, None)

    def forward(self, source: SwitchPort, frame: bytes) -> None:
        dst, src = frame[0:6], frame[6:12]
        if not src[0] & 1 and (src in self.table or len(self.table) < LEARNED_MACS):
            self.table[src] = source  # learn (a multicast source is never learned)
        target = None if dst[0] & 1 else self.table.get(dst)
        if target is not None:
            if target is not source:
                target.enqueue(frame)
            return
        for port in self.ports:  # broadcast, multicast, unknown: flood
            if port is not source:
                port.enqueue(frame)


class SwitchPort:
    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.queue: deque[bytes] = deque()
        self.queue_drops = 0
        self._ready = trio.Event()

    def enqueue(self, frame: bytes) -> None:
        if len(self.queue) >= PORT_QUEUE:
            self.queue_drops += 1
            return
        self.queue.append(frame)
        self._ready.set()

    async def receive(self) -> list[bytes]:
        while not self.queue:
            self._ready = trio.Event()
            await self._ready.wait()
        take = min(len(self.queue), BATCH)
        return [self.queue.popleft() for _ in range(take)]

    def transmit(self, frames: list[memoryview]) -> tuple[int, Counter[str]]:
        for frame in frames:
            self.switch.forward(self, bytes(frame))
        return sum(map(len, frames)), Counter()

    def describe(self) -> dict[str, Any]:
        return {"backend": "switch", "switch": self.switch.name, "ports": len(self.switch.ports),
                "queued": len(self.queue), "learned_macs": len(self.switch.table)}

    def close(self) -> None:
        self.switch.detach(self)
