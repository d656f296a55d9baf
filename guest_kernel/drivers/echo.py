"""Guest half of the echo device: ``await echo.echo(b"...")`` returns the bytes."""

from __future__ import annotations

from typing import Any

from vmbus.channel import Channel, Requestor
from vmbus.device import GuestDriver
from vmbus.protocols import echo


class EchoError(Exception):
    pass


class EchoDriver(GuestDriver):
    def __init__(self, channel: Channel) -> None:
        super().__init__(channel)
        self.requests = Requestor(channel)

    async def start(self, nursery: Any) -> None:
        nursery.start_soon(self.requests.run)

    async def stop(self) -> None:
        self.requests.fail_all()

    async def echo(self, data: bytes) -> bytes:
        pkt = await self.requests.request(echo.request(data))
        payload = bytes(pkt.payload)
        (status,) = echo.LENGTH.unpack_from(payload)
        if status != echo.STATUS_OK:
            raise EchoError(f"host refused the request (status {status})")
        return payload[echo.LENGTH.size : echo.LENGTH.size + len(data)]
