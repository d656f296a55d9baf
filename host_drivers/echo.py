"""Host half of the echo device: answer every request with its own bytes.

Written only against the driver API (``vmbus.device``): it drains a batch
of requests, checks each, and sends all completions with one commit.
"""

from __future__ import annotations

from ring import PacketType
from vmbus.channel import Channel
from vmbus.device import HostDevice
from vmbus.guest_memory import GuestMemory
from vmbus.protocols import echo


class EchoHost(HostDevice):
    async def serve(self, channel: Channel, memory: GuestMemory) -> None:
        while True:
            replies = []
            for pkt in await channel.receive():
                if pkt.type != PacketType.DATA_INBAND or not pkt.completion_requested:
                    continue  # nothing to answer; a real device would count it
                status, data = echo.parse_request(bytes(pkt.payload))
                replies.append((echo.completion(status, data), pkt.trans_id, False, PacketType.COMPLETION, b""))
            if replies:
                await channel.send_many(replies)
