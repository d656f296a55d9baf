"""A disk error says what happened in words and keeps its codes: the sense
table itself, and the errors a guest program gets from a real host."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from guest_kernel.drivers.storvsc import BlockError
from vmbus.protocols import storvsc as S

from ..bus.harness import host_process
from .helpers import run_guest

MiB = 1 << 20


@pytest.mark.parametrize(("sense", "words"), [
    ((0x2, 0x04, 0x00), "NOT READY, logical unit not ready (sense 0x2/0x4/0x0)"),
    ((0x2, 0x3A, 0x00), "NOT READY, medium not present (sense 0x2/0x3a/0x0)"),
    ((0x3, 0x11, 0x00), "MEDIUM ERROR, unrecovered read error (sense 0x3/0x11/0x0)"),
    ((0x3, 0x0C, 0x00), "MEDIUM ERROR, write error (sense 0x3/0xc/0x0)"),
    ((0x5, 0x21, 0x00), "ILLEGAL REQUEST, logical block address out of range (sense 0x5/0x21/0x0)"),
    ((0x5, 0x24, 0x00), "ILLEGAL REQUEST, invalid field in CDB (sense 0x5/0x24/0x0)"),
    ((0x5, 0x20, 0x00), "ILLEGAL REQUEST, invalid command operation code (sense 0x5/0x20/0x0)"),
    ((0x6, 0x29, 0x00), "UNIT ATTENTION, power on or reset occurred (sense 0x6/0x29/0x0)"),
    ((0x7, 0x27, 0x00), "DATA PROTECT, write-protected (read-only disk) (sense 0x7/0x27/0x0)"),
    ((0x7, 0x27, 0x07), "DATA PROTECT, space allocation failed (the host's storage is full) (sense 0x7/0x27/0x7)"),
    ((0xB, 0x47, 0x00), "ABORTED COMMAND, SCSI parity error (sense 0xb/0x47/0x0)"),
    ((0xB, 0x99, 0x01), "ABORTED COMMAND (sense 0xb/0x99/0x1)"),  # an ASC we have no words for
    ((0xF, 0x00, 0x00), "sense key 0xf (sense 0xf/0x0/0x0)"),  # a reserved key
])
def test_sense_in_words_with_its_codes(sense: tuple[int, int, int], words: str) -> None:
    assert S.describe_sense(*sense) == words
    assert S.parse_sense(S.fixed_sense(*sense)) == sense


def test_errors_from_the_host_read_in_words(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"w" * MiB)
    with host_process(tmp_path, "--disk", str(image), "--read-only") as host:

        async def body(kernel) -> list[tuple[str, tuple[int, int, int] | None, int | None]]:  # noqa: ANN001
            disk = kernel.device("storage")
            seen = []
            for call in (lambda: disk.write(0, bytes(512)), lambda: disk.read(MiB, 512)):
                with pytest.raises(BlockError) as info:
                    await call()
                seen.append((str(info.value), info.value.sense, info.value.errno))
            return seen

        (write, past_end) = run_guest(host.socket, body)
    assert write == ("SCSI WRITE_16 (0x8a) failed: DATA PROTECT, write-protected (read-only disk) (sense 0x7/0x27/0x0)",
                     S.WRITE_PROTECTED, errno.EROFS)
    assert past_end == ("SCSI READ_16 (0x88) failed: ILLEGAL REQUEST, logical block address out of range "
                        "(sense 0x5/0x21/0x0)", S.LBA_OUT_OF_RANGE, errno.EIO)
    assert image.read_bytes() == b"w" * MiB
