"""Guest half of KVP: the guest's key/value pools and its answers to the host.

The pools live in the driver (what Linux's ``hv_kvp_daemon`` keeps in its
pool files): the host SETs and DELETEs entries, GETs them and ENUMERATEs a
pool by index, ``NO_MORE_ITEMS`` past its end.  At start the guest
publishes who it is into the GUEST pool: host name, OS name and version,
kernel release, processor architecture and its IPv4 and IPv6 addresses
(the keys Linux's daemon uses for its AUTO pool).  Guest programs use the
same pools::

    kvp = kernel.device("kvp")
    await kvp.get("external", "role")        # a value the host set, or None
    await kvp.wait_for("external", "role")   # ... once the host has set it
    await kvp.set("guest", "status", "ready")  # for the host to read

Strings within 512 (key) and 2048 (value) bytes as UTF-16 with the NUL,
at most ``MAX_RECORDS`` entries per pool (a SET past it is answered
DISK_FULL); IP configuration requests are answered NOT_SUPPORTED.
"""

from __future__ import annotations

import platform
import socket

import trio

from vmbus.channel import Channel
from vmbus.protocols import ic

from .ic import IcDriver

MAX_RECORDS = 1024


def pool_number(pool: str | int) -> int:
    """A pool by name (``external``, ``guest``...) or number; ``ValueError`` otherwise."""
    if isinstance(pool, str):
        try:
            return int(ic.Pool[pool.upper()])
        except KeyError:
            raise ValueError(f"no KVP pool {pool!r}") from None
    if pool not in ic.EXCHANGED_POOLS:
        raise ValueError(f"no KVP pool {pool!r}")
    return int(pool)


def _fit(items: list[str]) -> str:
    """A semicolon-separated list cut at an item so it fits a KVP value."""
    out = ""
    for item in items:
        candidate = f"{out};{item}" if out else item
        if 2 * (len(candidate.encode("utf-16-le")) // 2 + 1) > ic.MAX_VALUE_BYTES:
            break
        out = candidate
    return out


def identity() -> dict[str, str]:
    """What the guest publishes about itself."""
    import psutil

    os_release: dict[str, str] = {}
    try:
        with open("/etc/os-release", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    os_release[key] = value.strip().strip('"')
    except OSError:
        pass
    v4: list[str] = []
    v6: list[str] = []
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET:
                v4.append(a.address)
            elif a.family == socket.AF_INET6:
                v6.append(a.address.split("%", 1)[0])
    return {
        "FullyQualifiedDomainName": socket.gethostname(),
        "OSName": os_release.get("NAME", platform.system()),
        "OSVersion": os_release.get("VERSION_ID", ""),
        "OSKernelVersion": platform.release(),
        "ProcessorArchitecture": platform.machine(),
        "NetworkAddressIPv4": _fit(v4),
        "NetworkAddressIPv6": _fit(v6),
    }


class KvpDriver(IcDriver):
    NAME = "kvp"
    MSGTYPE = ic.MsgType.KVP
    VERSIONS = ic.KVP_VERSIONS[1]
    MAX_MESSAGE = 16 << 10  # Linux reads KVP with 4 pages

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.pools: dict[int, dict[str, str]] = {int(p): {} for p in ic.Pool}
        self._changed = trio.Event()
        for key, value in identity().items():
            self._store(ic.Pool.GUEST, key, value)

    # -- the pools --------------------------------------------------------------------

    def _store(self, pool: int, key: str, value: str) -> bool:
        entries = self.pools[pool]
        if key not in entries and len(entries) >= MAX_RECORDS:
            return False
        entries[key] = value
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def get(self, pool: str | int, key: str) -> str | None:
        return self.pools[pool_number(pool)].get(key)

    async def set(self, pool: str | int, key: str, value: str) -> None:
        number = pool_number(pool)
        ic.encode_utf16z(key, ic.MAX_KEY_BYTES, "key")  # the limits the host would refuse at
        ic.encode_utf16z(value, ic.MAX_VALUE_BYTES, "value")
        if not self._store(number, key, value):
            raise ValueError(f"KVP pool {pool} is full ({MAX_RECORDS} entries)")

    async def delete(self, pool: str | int, key: str) -> bool:
        return self.pools[pool_number(pool)].pop(key, None) is not None

    def items(self, pool: str | int) -> dict[str, str]:
        return dict(self.pools[pool_number(pool)])

    async def wait_for(self, pool: str | int, key: str) -> str:
        """The value of ``key`` once it is there (set by the host, say)."""
        entries = self.pools[pool_number(pool)]
        while key not in entries:
            await self._changed.wait()
        return entries[key]

    # -- the host's requests -----------------------------------------------------------

    def handle(self, msg: ic.IcMessage) -> tuple[int, bytes]:
        request = ic.parse_kvp_request(msg.body)
        if request.pool not in ic.EXCHANGED_POOLS:
            return ic.Status.INVALID_ARG, msg.body
        entries = self.pools[request.pool]
        if request.op == ic.KvpOp.GET:
            value = entries.get(request.key)
            if value is None:
                return ic.Status.NOT_FOUND, msg.body
            return ic.Status.OK, ic.encode_kvp(ic.KvpOp.GET, request.pool, key=request.key, value=value)
        if request.op == ic.KvpOp.SET:
            if not self._store(request.pool, request.key, request.value):
                return ic.Status.DISK_FULL, msg.body
            return ic.Status.OK, msg.body
        if request.op == ic.KvpOp.DELETE:
            found = entries.pop(request.key, None) is not None
            return (ic.Status.OK if found else ic.Status.NOT_FOUND), msg.body
        if request.op == ic.KvpOp.ENUMERATE:
            if request.index >= len(entries):
                return ic.Status.NO_MORE_ITEMS, msg.body
            key, value = list(entries.items())[request.index]
            return ic.Status.OK, ic.encode_kvp(ic.KvpOp.ENUMERATE, request.pool, index=request.index,
                                               key=key, value=value)
        return ic.Status.NOT_SUPPORTED, msg.body
