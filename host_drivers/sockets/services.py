"""The host services guest ports are forwarded to (``services=`` option).

``80=tcp:127.0.0.1:8080;81=unix:/run/app.sock`` maps guest-visible ports
(a number up to 0x7FFFFFFF, or a service GUID) to a TCP address or a Unix
socket path.  Parsing happens once, when the option is checked; a guest
only ever names a port, which is looked up here, so no guest byte reaches
a host address or path.  Connecting is trio's, non-blocking, with a bound
on the time it may take.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import trio

from vmbus.protocols import hvsock


@dataclass(frozen=True)
class Target:
    kind: str  # "tcp" or "unix"
    host: str
    port: int = 0

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}" if self.kind == "tcp" else f"unix:{self.host}"

    async def connect(self) -> trio.SocketStream:
        if self.kind == "tcp":
            return await trio.open_tcp_stream(self.host, self.port)
        return await trio.open_unix_socket(self.host)


def parse_target(text: str) -> Target:
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Target("unix", rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and 0 < int(port) < 65536:
            return Target("tcp", host, int(port))
    raise ValueError(f"{text!r} is not tcp:HOST:PORT or unix:PATH")


def parse_services(text: str) -> dict[uuid.UUID, Target]:
    """``PORT=TARGET;PORT=TARGET`` -> {service GUID: target}; ValueError in words."""
    services: dict[uuid.UUID, Target] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        port, eq, target = item.partition("=")
        if not eq:
            raise ValueError(f"{item!r} is not PORT=tcp:HOST:PORT or PORT=unix:PATH")
        service = hvsock.parse_address(port)
        if service in services:
            raise ValueError(f"{hvsock.describe(service)} is forwarded twice")
        services[service] = parse_target(target.strip())
    return services
