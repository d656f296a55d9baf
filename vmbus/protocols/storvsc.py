"""Wire format of the paravirtual SCSI disk (storvsc guest <-> storvsp host).

Layouts from torvalds/linux drivers/scsi/storvsc_drv.c and microsoft/openvmm
vm/devices/storage/storvsp_protocol (reference section 6): the 64-byte
``vstor_packet`` (operation, flags, status, then a 52-byte union), the
52-byte Win8 ``vmscsi_request`` inside it, channel properties and the
protocol version word.  SCSI values (opcodes, status, sense keys and
codes) are the standard SPC/SBC ones.

A data transfer rides as a GPA-direct packet (type 9): one range naming
the guest pages, and this packet in-band after it.
"""

from __future__ import annotations

import struct
import uuid
from enum import IntEnum
from typing import Final

from ring import PAGE_SIZE

INTERFACE_ID: Final = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")  # HV_SCSI_GUID

PACKET: Final = struct.Struct("<III52s")  # operation, flags, status, union
PACKET_SIZE: Final = 64
# The largest transfer one request may carry, and the pages its one GPA range
# may name (a transfer starting inside a page touches one more): exactly what
# both C paths accept (SV_MAX_TRANSFER / SV_MAX_PAGES in vmbus/csrc/
# storvsc_wire.h; a test pins the two).  A host never advertises more, a
# guest never uses more than this even if a host advertises it.
MAX_TRANSFER: Final = 8 << 20
MAX_PAGES: Final = MAX_TRANSFER // PAGE_SIZE + 1
REQUEST_COMPLETION_FLAG: Final = 0x1
# vmscsi_request (Win8+, 52 bytes): length, srb_status, scsi_status, port,
# path, target, lun, cdb_length, sense_info_length, data_in, reserved,
# data_transfer_length, cdb/sense[20], reserve, queue_tag, queue_action,
# srb_flags, time_out_value, queue_sort_key
SCSI_REQUEST: Final = struct.Struct("<HBBBBBBBBBBI20sHBBIII")
SCSI_REQUEST_SIZE: Final = 52
SENSE_SIZE: Final = 20
PROPERTIES: Final = struct.Struct("<IHHIIQ")  # reserved, max_channel_cnt, reserved1, flags, max_transfer, reserved2
PROTOCOL_VERSION: Final = struct.Struct("<HH")  # major_minor, revision
SUB_CHANNEL_COUNT: Final = struct.Struct("<H")
SUPPORTS_MULTI_CHANNEL: Final = 0x1

DATA_IN: Final = 1  # SCSI_IOCTL_DATA_IN: a read
SRB_FLAGS_DATA_IN: Final = 0x40
SRB_FLAGS_DATA_OUT: Final = 0x80


class Operation(IntEnum):
    COMPLETE_IO = 1
    REMOVE_DEVICE = 2
    EXECUTE_SRB = 3
    RESET_LUN = 4
    RESET_ADAPTER = 5
    RESET_BUS = 6
    BEGIN_INITIALIZATION = 7
    END_INITIALIZATION = 8
    QUERY_PROTOCOL_VERSION = 9
    QUERY_PROPERTIES = 10
    ENUMERATE_BUS = 11
    FCHBA_DATA = 12
    CREATE_SUB_CHANNELS = 13


class ProtocolVersion(IntEnum):
    WIN8 = 0x0501
    WIN8_1 = 0x0600
    WIN10 = 0x0602


class NtStatus(IntEnum):
    SUCCESS = 0
    UNSUCCESSFUL = 0xC0000001
    INVALID_PARAMETER = 0xC000000D
    INVALID_DEVICE_REQUEST = 0xC0000010
    REVISION_MISMATCH = 0xC0000059
    INVALID_DEVICE_STATE = 0xC0000184


class SrbStatus(IntEnum):
    SUCCESS = 0x01
    ABORTED = 0x02
    ERROR = 0x04
    INVALID_REQUEST = 0x06
    INVALID_LUN = 0x20
    AUTOSENSE_VALID = 0x80  # flag bit


class ScsiStatus(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class Opcode(IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    UNMAP = 0x42
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E  # READ CAPACITY 16 is service action 0x10
    REPORT_LUNS = 0xA0


READ_CAPACITY_16_ACTION: Final = 0x10
# (sense key, ASC, ASCQ) for the errors the device reports
LBA_OUT_OF_RANGE: Final = (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_OPCODE: Final = (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
INVALID_FIELD_IN_CDB: Final = (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
INVALID_FIELD_IN_PARAMETERS: Final = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
WRITE_PROTECTED: Final[tuple[int, int, int]] = (SenseKey.DATA_PROTECT, 0x27, 0x00)
SPACE_ALLOCATION_FAILED: Final[tuple[int, int, int]] = (SenseKey.DATA_PROTECT, 0x27, 0x07)
UNRECOVERED_READ_ERROR: Final = (SenseKey.MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR: Final = (SenseKey.MEDIUM_ERROR, 0x0C, 0x00)


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """18-byte fixed-format sense data (response code 0x70), padded to 20."""
    return struct.pack(">BBBIBIBBBBBB", 0x70, 0, key, 0, 10, 0, asc, ascq, 0, 0, 0, 0) + bytes(2)


def parse_sense(data: bytes) -> tuple[int, int, int]:
    if len(data) < 14 or data[0] & 0x7F not in (0x70, 0x71):
        return 0, 0, 0
    return data[2] & 0xF, data[12], data[13]


# The additional sense codes (ASC, ASCQ) a disk commonly reports, in words
# (SPC-4 annex D, the table Linux prints from drivers/scsi/sense_codes.h).
ADDITIONAL_SENSE: Final[dict[tuple[int, int], str]] = {
    (0x04, 0x00): "logical unit not ready",
    (0x04, 0x01): "logical unit becoming ready",
    (0x04, 0x02): "logical unit not ready, start required",
    (0x0C, 0x00): "write error",
    (0x11, 0x00): "unrecovered read error",
    (0x1A, 0x00): "parameter list length error",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x27, 0x00): "write-protected (read-only disk)",
    (0x27, 0x07): "space allocation failed (the host's storage is full)",
    (0x28, 0x00): "medium may have changed",
    (0x29, 0x00): "power on or reset occurred",
    (0x2A, 0x09): "capacity data has changed",
    (0x3A, 0x00): "medium not present",
    (0x3F, 0x0E): "reported LUNs data has changed",
    (0x44, 0x00): "internal target failure",
    (0x47, 0x00): "SCSI parity error",
}


def describe_sense(key: int, asc: int, ascq: int) -> str:
    """Sense data in words, the codes kept: ``DATA PROTECT, write-protected
    (read-only disk) (sense 0x7/0x27/0x0)``."""
    try:
        words = SenseKey(key).name.replace("_", " ")
    except ValueError:
        words = f"sense key {key:#x}"
    detail = ADDITIONAL_SENSE.get((asc, ascq))
    if detail:
        words += f", {detail}"
    return f"{words} (sense {key:#x}/{asc:#x}/{ascq:#x})"


def packet(operation: int, status: int = 0, body: bytes = b"") -> bytes:
    return PACKET.pack(operation, REQUEST_COMPLETION_FLAG, status, body.ljust(52, b"\0"))


def scsi_request(
    cdb: bytes, data_in: bool, transfer_length: int, *, lun: int = 0, target: int = 0, path: int = 0
) -> bytes:
    return SCSI_REQUEST.pack(
        SCSI_REQUEST_SIZE, 0, 0, 0, path, target, lun, len(cdb), SENSE_SIZE, DATA_IN if data_in else 0, 0,
        transfer_length, cdb.ljust(20, b"\0"), 0, 0, 0,
        SRB_FLAGS_DATA_IN if data_in else (SRB_FLAGS_DATA_OUT if transfer_length else 0), 60, 0,
    )


def read_write_cdb(write: bool, lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """READ/WRITE 16 (covers every LBA and count this device accepts)."""
    op = Opcode.WRITE_16 if write else Opcode.READ_16
    return struct.pack(">BBQIBB", op, 0x08 if fua else 0, lba, blocks, 0, 0)
