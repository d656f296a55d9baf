"""KVP host: key/value pools shared with the guest.

The host keeps, per partition (one ``KvpHost`` per guest), what it knows of
each pool: the values it set and those it read back.  ``set``/``delete``
change a pool in the guest (the EXTERNAL pool is where a host leaves values
for guest programs); ``get``/``enumerate`` read the guest's pools (the GUEST
pool is where the guest publishes its host name, OS and addresses).  After
negotiation the host sets the EXTERNAL values in its config (``values``:
key -> value), then enumerates the GUEST pool, again every ``refresh``
seconds (config, default 10 s).

Keys and values are strings, sent as UTF-16 with their NUL within 512 and
2048 bytes (ic-reference.md section 7.2): a longer one is refused before
anything is sent.  Every answer is parsed strictly (``ic.parse_kvp_answer``)
and an enumeration stops after ``MAX_RECORDS`` entries, so a guest cannot
make the host keep more than ``MAX_RECORDS`` entries per pool.
"""

from __future__ import annotations

from typing import Any

import trio

from vmbus.device import DeviceCommandError
from vmbus.protocols import ic

from .service import IcError, IcHost, IcRefused, check_arguments, positive_seconds

MAX_RECORDS = 1024  # entries per pool the host keeps (and enumerates)
POOL_NAMES = {p.name.lower(): p for p in ic.EXCHANGED_POOLS}


def pool_number(value: str | int) -> int:
    """A pool by name (``external``, ``guest``, ``auto``, ``auto_external``) or number."""
    if isinstance(value, str) and value.lower() in POOL_NAMES:
        return int(POOL_NAMES[value.lower()])
    if type(value) is int and value in ic.EXCHANGED_POOLS:
        return value
    raise DeviceCommandError(f"no KVP pool {value!r}: one of {', '.join(POOL_NAMES)}")


class KvpHost(IcHost):
    NAME = "kvp"
    MSGTYPE = ic.MsgType.KVP
    VERSIONS = ic.KVP_VERSIONS[0]

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.refresh = positive_seconds(config, "refresh", 10.0)
        self.pools: dict[int, dict[str, str]] = {int(p): {} for p in ic.EXCHANGED_POOLS}
        self.initial = dict(config.get("values", {}))
        for key, value in self.initial.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError("kvp values must map strings to strings")
            ic.encode_kvp(ic.KvpOp.SET, ic.Pool.EXTERNAL, key=key, value=value)  # ValueError past the limits

    async def run(self) -> None:
        for key, value in self.initial.items():
            try:
                await self.set(ic.Pool.EXTERNAL, key, value)
            except IcError:
                pass  # counted; the admin socket can set it again
        while True:
            try:
                await self.enumerate(ic.Pool.GUEST)
            except IcError:
                pass  # counted; tried again at the next refresh
            await trio.sleep(self.refresh)

    def _remember(self, pool: int, key: str, value: str) -> None:
        store = self.pools[pool]
        if key in store or len(store) < MAX_RECORDS:
            store[key] = value

    async def get(self, pool: int, key: str) -> str | None:
        """The guest's value of ``key`` in ``pool``, or None if it has none."""
        body = ic.encode_kvp(ic.KvpOp.GET, pool, key=key)
        answer = await self.transact(self.MSGTYPE, body, timeout=self.timeout)
        if answer.status == ic.Status.NOT_FOUND:
            self.pools[pool].pop(key, None)
            return None
        if answer.status != ic.Status.OK:
            self.counters["failed"] += 1
            raise IcRefused(f"the guest refused KVP get {key!r}: {ic.status_name(answer.status)}")
        got_key, value = self._parse(answer, ic.KvpOp.GET)
        if got_key != key:
            self.refuse("bad_messages", f"KVP get {key!r} answered for key {got_key!r}")
            raise IcError(f"the guest answered KVP get {key!r} for another key")
        self._remember(pool, key, value)
        return value

    async def set(self, pool: int, key: str, value: str) -> None:
        body = ic.encode_kvp(ic.KvpOp.SET, pool, key=key, value=value)  # ValueError past the limits
        await self.request(self.MSGTYPE, body)
        self._remember(pool, key, value)

    async def delete(self, pool: int, key: str) -> None:
        await self.request(self.MSGTYPE, ic.encode_kvp(ic.KvpOp.DELETE, pool, key=key))
        self.pools[pool].pop(key, None)

    async def enumerate(self, pool: int) -> dict[str, str]:
        """Every entry of the guest's ``pool`` (at most ``MAX_RECORDS``);
        the host's copy of the pool becomes exactly that."""
        found: dict[str, str] = {}
        for index in range(MAX_RECORDS):
            answer = await self.transact(self.MSGTYPE, ic.encode_kvp(ic.KvpOp.ENUMERATE, pool, index=index),
                                         timeout=self.timeout)
            if answer.status == ic.Status.NO_MORE_ITEMS:
                break
            if answer.status != ic.Status.OK:
                self.counters["failed"] += 1
                raise IcRefused(f"the guest refused KVP enumerate at {index}: {ic.status_name(answer.status)}")
            key, value = self._parse(answer, ic.KvpOp.ENUMERATE)
            found[key] = value
        self.pools[pool] = found
        return dict(found)

    def _parse(self, answer: ic.IcMessage, op: int) -> tuple[str, str]:
        try:
            return ic.parse_kvp_answer(answer.body, op)
        except ic.IcFormatError as exc:
            self.refuse("bad_messages", f"KVP answer: {exc}")
            raise IcError(f"the guest's KVP answer is malformed: {exc}") from None

    async def admin(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        schema: dict[str, type] = {"pool": str, "key": str, "value": str}
        if command == "list":
            check_arguments(args, {"pool": str})
            pool = pool_number(args.get("pool", "guest"))
            return {"pool": ic.Pool(pool).name.lower(), "items": await self.enumerate(pool)}
        if command not in ("get", "set", "delete"):
            return await super().admin(command, args)
        check_arguments(args, schema, ("key", "value") if command == "set" else ("key",))
        if command != "set" and "value" in args:
            raise DeviceCommandError(f"kvp {command} takes no value")
        pool = pool_number(args.get("pool", "external" if command == "set" else "guest"))
        key = args["key"]
        try:
            if command == "get":
                value = await self.get(pool, key)
                if value is None:
                    raise DeviceCommandError(f"the guest has no key {key!r} in the {ic.Pool(pool).name.lower()} pool")
                return {"key": key, "value": value}
            if command == "set":
                await self.set(pool, key, args["value"])
            else:
                await self.delete(pool, key)
        except ValueError as exc:  # a key or value past the limits, refused before sending
            raise DeviceCommandError(str(exc)) from None
        return {"key": key}

    def service_snapshot(self) -> dict[str, Any]:
        return {"pools": {ic.Pool(p).name.lower(): len(entries) for p, entries in self.pools.items()}}
