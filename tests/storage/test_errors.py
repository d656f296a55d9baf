"""Every error the disk can report, through the real guest driver and as raw
hostile packets on the real channel; none of them stops the host."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

from guest_kernel.drivers.storvsc import BlockError
from host_drivers.storage import scsi
from host_drivers.storage.backend import DiskImage
from ring import GpaRange, PacketType
from ring._api import encode_gpa_direct_header
from vmbus.protocols import storvsc as S

from ..bus.harness import PVBUS, host_process
from .helpers import run_guest

MiB = 1 << 20


def _disk_args(tmp_path: Path, *extra: str) -> tuple[str, ...]:
    return ("--disk", str(tmp_path / "d.img"), "--disk-size", "4M", *extra)


def test_scsi_commands_and_errors_through_the_driver(tmp_path: Path) -> None:
    with host_process(tmp_path, *_disk_args(tmp_path)) as host:

        async def body(kernel) -> None:  # noqa: ANN001
            disk = kernel.device("storage")
            inquiry = await disk.scsi(bytes([S.Opcode.INQUIRY, 0, 0, 0, 36, 0]), data_in=True, length=36)
            assert inquiry[0] == 0 and inquiry[8:16] == b"PVBUS   "
            vpd = await disk.scsi(bytes([S.Opcode.INQUIRY, 1, 0xB2, 0, 8, 0]), data_in=True, length=8)
            assert vpd[1] == 0xB2 and vpd[5] & 0x80  # UNMAP supported
            cap10 = await disk.scsi(bytes([S.Opcode.READ_CAPACITY_10]) + bytes(9), data_in=True, length=8)
            assert struct.unpack(">II", cap10) == (4 * MiB // 512 - 1, 512)
            assert await disk.scsi(bytes(6), data_in=False, length=0) == b""  # TEST UNIT READY
            luns = await disk.scsi(bytes([S.Opcode.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]),
                                    data_in=True, length=16)
            assert struct.unpack_from(">I", luns)[0] == 8
            with pytest.raises(BlockError) as info:
                await disk.read(4 * MiB, 512)  # one block past the end
            assert info.value.sense == S.LBA_OUT_OF_RANGE
            with pytest.raises(BlockError) as info:
                await disk.read(4 * MiB - 512, 1024)  # straddles the end
            assert info.value.sense == S.LBA_OUT_OF_RANGE
            with pytest.raises(BlockError) as info:
                await disk.scsi(bytes([0xFF]) + bytes(5), data_in=False, length=0)
            assert info.value.sense == S.INVALID_OPCODE
            with pytest.raises(BlockError) as info:
                await disk.scsi(bytes([S.Opcode.MODE_SENSE_6, 0, 0x1C, 0, 64, 0]), data_in=True, length=64)
            assert info.value.sense == S.INVALID_FIELD_IN_CDB
            with pytest.raises(ValueError):
                await disk.read(0, 2 * MiB)  # beyond the advertised transfer: refused before sending
            with pytest.raises(ValueError):
                await disk.write(100, b"x" * 512)  # not block aligned
            await disk.write(0, b"still fine" + bytes(502))
            assert (await disk.read(0, 512))[:10] == b"still fine"

        run_guest(host.socket, body)


def test_read_only_disk_refuses_writes(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(b"r" * (1 * MiB))
    with host_process(tmp_path, "--disk", str(tmp_path / "d.img"), "--read-only") as host:

        async def body(kernel) -> None:  # noqa: ANN001
            disk = kernel.device("storage")
            assert disk.read_only
            assert await disk.read(0, 512) == b"r" * 512
            for call in (disk.write(0, bytes(512)), disk.discard(0, 512)):
                with pytest.raises(BlockError) as info:
                    await call
                assert info.value.sense == S.WRITE_PROTECTED

        run_guest(host.socket, body)
    assert (tmp_path / "d.img").read_bytes() == b"r" * MiB


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root to mount a tmpfs")
def test_enospc_gives_space_allocation_failed(tmp_path: Path) -> None:
    """A real ENOSPC: the image lives on a 1 MiB tmpfs (in the host's own
    mount namespace) and the guest writes 2 MiB of it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    sock = str(tmp_path / "h.sock")
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {' '.join(PVBUS)} host --socket {sock} "
              f"--disk {mnt}/d.img --disk-size 8M --device storage")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")

        async def body(kernel) -> list:  # noqa: ANN001
            disk = kernel.device("storage")
            errors = []
            for off in range(0, 2 * MiB, 256 * 1024):
                try:
                    await disk.write(off, os.urandom(256 * 1024))
                except BlockError as exc:
                    errors.append(exc.sense)
            assert await disk.read(0, 512)  # still serving
            return errors

        errors = run_guest(sock, body, ram_mib=32)
        assert errors and set(errors) == {S.SPACE_ALLOCATION_FAILED}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class _FailingDisk(DiskImage):
    """Stand-in for a failing medium: no device here can produce a real EIO
    (device-mapper's tools do not match this kernel), so the backend raises
    the OSError a failing disk would."""

    def readv(self, iov: Any, offset: int) -> NoReturn:
        raise OSError(errno.EIO, "Input/output error")

    def writev(self, iov: Any, offset: int, *, fua: bool = False) -> NoReturn:
        raise OSError(errno.EIO, "Input/output error")


def test_eio_maps_to_medium_errors(tmp_path: Path) -> None:
    disk = _FailingDisk(str(tmp_path / "e.img"), size=MiB)
    buf = [memoryview(bytearray(4096))]
    r = scsi.execute(disk, S.read_write_cdb(False, 0, 8), True, buf, 4096)
    w = scsi.execute(disk, S.read_write_cdb(True, 0, 8), False, buf, 4096)
    assert (r.status, r.sense) == (S.ScsiStatus.CHECK_CONDITION, S.UNRECOVERED_READ_ERROR)
    assert (w.status, w.sense) == (S.ScsiStatus.CHECK_CONDITION, S.WRITE_ERROR)
    disk.close()


def _srb_packet(cdb: bytes, data_in: bool, transfer: int, *, lun: int = 0, cdb_len: int | None = None) -> bytes:
    srb = bytearray(S.scsi_request(cdb, data_in, transfer, lun=lun))
    if cdb_len is not None:
        srb[8] = cdb_len  # byte 8 of vmscsi_request
    return S.packet(S.Operation.EXECUTE_SRB, 0, bytes(srb))


def test_hostile_packets_get_error_status_and_touch_nothing(tmp_path: Path) -> None:
    with host_process(tmp_path, *_disk_args(tmp_path)) as host:

        async def body(kernel) -> None:  # noqa: ANN001
            disk = kernel.device("storage")
            q = disk.queues[0]
            await disk.write(0, b"K" * 4096)
            pfn = kernel.ram.alloc(1)
            read8 = S.read_write_cdb(False, 0, 8)
            write8 = S.read_write_cdb(True, 0, 8)

            def gpa(ranges: list[GpaRange]) -> bytes:
                return encode_gpa_direct_header(ranges)

            cases = {
                "unknown operation": (S.packet(99), PacketType.DATA_INBAND, b""),
                "truncated SRB": (S.packet(S.Operation.EXECUTE_SRB)[:30], PacketType.DATA_INBAND, b""),
                "CDB length 17": (_srb_packet(read8, True, 0, cdb_len=17), PacketType.DATA_INBAND, b""),
                "transfer beyond max": (_srb_packet(S.read_write_cdb(False, 0, 4096), True, 2 * 1024 * 1024),
                                        PacketType.DATA_USING_GPA_DIRECT, gpa([GpaRange(2 << 20, 0, [pfn] * 512)])),
                "data without pages": (_srb_packet(read8, True, 4096), PacketType.DATA_INBAND, b""),
                "page outside RAM": (_srb_packet(write8, False, 4096), PacketType.DATA_USING_GPA_DIRECT,
                                     gpa([GpaRange(4096, 0, [10**9])])),
                "range shorter than transfer": (_srb_packet(write8, False, 4096), PacketType.DATA_USING_GPA_DIRECT,
                                                gpa([GpaRange(512, 0, [pfn])])),
                "two ranges": (_srb_packet(write8, False, 4096), PacketType.DATA_USING_GPA_DIRECT,
                               gpa([GpaRange(2048, 0, [pfn]), GpaRange(2048, 0, [pfn])])),
                "missing PFNs": (_srb_packet(write8, False, 8192), PacketType.DATA_USING_GPA_DIRECT,
                                 gpa([GpaRange(8192, 0, [pfn])])),
            }
            for name, item in cases.items():
                (pkt,) = await q.request_many([item])
                operation, _, status, _ = S.PACKET.unpack_from(bytes(pkt.payload).ljust(64, b"\0"))
                assert operation == S.Operation.COMPLETE_IO and status != S.NtStatus.SUCCESS, name
            # a request for LUN 3: answered, with SRB status INVALID_LUN
            (pkt,) = await q.request_many([(_srb_packet(bytes(6), False, 0, lun=3), PacketType.DATA_INBAND, b"")])
            srb = S.SCSI_REQUEST.unpack_from(bytes(pkt.payload), 12)
            assert srb[1] & 0x3F == S.SrbStatus.INVALID_LUN
            # a packet that asks for no completion is dropped; a completion from the guest too
            await disk.channel.send(_srb_packet(write8, False, 0))
            await disk.channel.send(b"\0" * 64, packet_type=PacketType.COMPLETION, trans_id=5)
            # nothing was written by any of it, and the disk still works
            assert await disk.read(0, 4096) == b"K" * 4096

        run_guest(host.socket, body)


def test_corrupt_ring_closes_only_that_channel(tmp_path: Path) -> None:
    with host_process(tmp_path, *_disk_args(tmp_path)) as host:

        async def body(kernel) -> None:  # noqa: ANN001
            import trio

            disk = kernel.device("storage")
            ring = disk.queues[1].channel.outgoing
            # a descriptor with an unknown type, published and signalled
            ring._mem[4096 : 4096 + 16] = struct.pack("<HHHHQ", 0x42, 2, 4, 1, 1)
            ring._mem[0:4] = struct.pack("<I", 40)
            disk.queues[1].channel.signal()
            from vmbus.host import admin_request

            with trio.fail_after(30):
                while True:
                    snap = await admin_request(host.socket, {"cmd": "inspect"})
                    if snap["partitions"][0]["rejected"].get("ring"):
                        break
                    await trio.sleep(0.01)
            # the host rescinded that one queue; the guest stops using it
            with trio.fail_after(30):
                while not disk.queues[1].channel.revoked:
                    await trio.sleep(0.01)
            assert await kernel.device("echo").echo(b"alive") == b"alive"
            for _ in range(8):  # every remaining queue still serves
                assert len(await disk.read(0, 512)) == 512

        run_guest(host.socket, body)
