"""Shared pieces of the NIC tests: the in-process pair on a switch, frames,
and what the real-process tests need from the machine (root, /dev/net/tun,
network namespaces), with the reason when it is missing."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest

from guest_kernel.memory import GuestRam
from host_drivers.net.backends import Switch, SwitchPort
from pvbus.devices import NET
from vmbus.testing import DevicePair, open_device_pair

GUEST_MAC = bytes.fromhex("00155d000001")
PEER_MAC = bytes.fromhex("00155d0000fe")


def frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (0x88B5: the local experimental ethertype)."""
    return dst + src + struct.pack(">H", ethertype) + payload


@asynccontextmanager
async def nic_on_switch(mtu: int = 1500) -> AsyncIterator[tuple[DevicePair, SwitchPort]]:
    """The NIC's two halves in one process on a switch of their own, and a
    second port of that switch standing in for the rest of the network."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    ram = GuestRam(64 << 20)
    try:
        config = {"backend": "switch", "switch": name, "mac": GUEST_MAC.hex(":"), "mtu": mtu}
        async with open_device_pair(NET, config=config, ram=ram) as pair:
            peer = Switch.named(name).attach()
            try:
                yield pair, peer
            finally:
                peer.close()
    finally:
        ram.close()


def need_network_privileges() -> None:
    """Skip, saying why, unless this process can make TAP interfaces and
    network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("needs root (TAP interfaces and network namespaces)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    for tool, package in (("ip", "iproute2"), ("ping", "iputils-ping")):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} ({package}; make system-packages installs it)")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot create network namespaces: {probe.stderr.decode().strip()}")


@contextmanager
def netns(prefix: str) -> Iterator[str]:
    """A named network namespace, removed after."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
