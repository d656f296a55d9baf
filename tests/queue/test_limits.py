"""Transfer limits come from one place and are what both C paths take.

``vmbus.protocols.storvsc.MAX_TRANSFER`` / ``MAX_PAGES`` and the wire
header's ``SV_MAX_TRANSFER`` / ``SV_MAX_PAGES`` are pinned to each other;
a host configured for 2 MiB and 8 MiB transfers serves them through both
C paths (data checked by SHA-256 on the image), and a host configured
beyond the limit is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from guest_kernel.drivers._storvsc_c import lib as guest_c
from guest_kernel.memory import GuestRam
from host_drivers.storage._storvsp_c import lib as host_c
from host_drivers.storage.device import StorvspHost
from pvbus.devices import STORAGE
from ring import PAGE_SIZE
from ring.queue import lib as ring_c
from vmbus.protocols import storvsc as S
from vmbus.testing import open_device_pair


def test_limits_are_one_set_of_numbers() -> None:
    assert guest_c.SV_MAX_TRANSFER == host_c.SV_MAX_TRANSFER == S.MAX_TRANSFER
    assert guest_c.SV_MAX_PAGES == host_c.SV_MAX_PAGES == S.MAX_PAGES == S.MAX_TRANSFER // PAGE_SIZE + 1
    assert ring_c.PV_PAGE_SIZE == guest_c.PV_PAGE_SIZE == PAGE_SIZE


def test_a_host_configured_beyond_the_limit_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with pytest.raises(ValueError, match="the most its C paths take"):
        StorvspHost({"path": str(image), "max_transfer": S.MAX_TRANSFER + PAGE_SIZE})
    with pytest.raises(ValueError, match="multiple of 4096"):
        StorvspHost({"path": str(image), "max_transfer": 3000})


@pytest.mark.parametrize("size", [2 << 20, 8 << 20])
async def test_large_transfers_as_advertised(tmp_path: Path, size: int) -> None:
    """A host advertising ``size``: writes and reads of exactly that size, by
    copy and zero-copy, at a page-aligned and an unaligned-to-the-transfer
    offset; nothing refused on either side."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(3 * size))
    ram = GuestRam(4 * size + (16 << 20))
    try:
        config = {"path": str(image), "subchannels": 0, "max_transfer": size}
        async with open_device_pair(STORAGE, config=config, ram=ram) as pair:
            disk: Any = pair.guest  # the storvsc driver
            assert disk.max_transfer == size
            first, second = os.urandom(size), os.urandom(size)
            await disk.write(0, first)
            with disk.buffer(size) as buf:
                buf.view[:] = second
                await disk.write_from([size + 512], [buf])
            assert hashlib.sha256(await disk.read(0, size)).digest() == hashlib.sha256(first).digest()
            with disk.buffer(size) as buf:
                await disk.read_into([size + 512], [buf])
                assert hashlib.sha256(buf.view).digest() == hashlib.sha256(second).digest()
            with pytest.raises(ValueError, match="exceed the largest transfer"):
                await disk.read(0, size + 512)
            host: Any = pair.host  # the storvsp
            assert host.errors == {}  # nothing was refused on the host
        on_disk = image.read_bytes()
        assert hashlib.sha256(on_disk[:size]).digest() == hashlib.sha256(first).digest()
        assert hashlib.sha256(on_disk[size + 512 : 2 * size + 512]).digest() == hashlib.sha256(second).digest()
    finally:
        ram.close()
