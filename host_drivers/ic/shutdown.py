"""Shutdown host: ask the guest to power off or reboot.

Nothing periodic: ``request_shutdown(reboot, force)`` sends one request and
returns once the guest has answered (a guest answers before it acts,
as Linux does), raising ``IcError`` in words if it refused, did not answer
or has no open shutdown channel.  The admin socket reaches it through
``admin("shutdown", {"reboot": bool, "force": bool})``.
"""

from __future__ import annotations

from typing import Any

from vmbus.protocols import ic

from .service import IcError, IcHost, check_arguments


class ShutdownHost(IcHost):
    NAME = "shutdown"
    MSGTYPE = ic.MsgType.SHUTDOWN
    VERSIONS = ic.SHUTDOWN_VERSIONS[0]

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.requests_answered = 0
        self.last_request: dict[str, Any] | None = None

    async def request_shutdown(self, reboot: bool, force: bool) -> dict[str, Any]:
        self.last_request = {"reboot": reboot, "force": force, "answer": None}
        try:
            await self.request(self.MSGTYPE, ic.encode_shutdown(reboot=reboot, force=force))
        except IcError as exc:
            self.last_request["answer"] = str(exc)
            raise
        self.requests_answered += 1
        self.last_request["answer"] = "OK"
        return {"action": "reboot" if reboot else "power off", "force": force}

    async def admin(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command != "shutdown":
            return await super().admin(command, args)
        check_arguments(args, {"reboot": bool, "force": bool})
        return await self.request_shutdown(bool(args.get("reboot", False)), bool(args.get("force", False)))

    def service_snapshot(self) -> dict[str, Any]:
        return {"requests_answered": self.requests_answered, "last_request": self.last_request}
