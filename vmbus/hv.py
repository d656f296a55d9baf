"""The hypervisor ABI the guest kernel and the host agree on.

Numbers from torvalds/linux include/asm-generic/hyperv-tlfs.h and
drivers/hv/hyperv_vmbus.h (reference sections 4.1-4.4): hypercall codes,
the 64-bit hypercall input value, HV_STATUS codes, the HvPostMessage input
block, the 256-byte SynIC message and the synthetic MSRs.

How the exits travel between two processes is the transport's business
(``vmbus.transport``); this module only knows the bytes.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final


class HvCall(IntEnum):
    POST_MESSAGE = 0x005C
    SIGNAL_EVENT = 0x005D
    # Not a Hyper-V call: in one machine the hypervisor wires a channel's
    # event port itself; between two processes the eventfd behind the port
    # must travel to the guest, which asks for it once per connection id.
    CONNECT_EVENT_PORT = 0x8001


class HvStatus(IntEnum):
    SUCCESS = 0x0
    INVALID_HYPERCALL_CODE = 0x2
    INVALID_HYPERCALL_INPUT = 0x3
    INVALID_ALIGNMENT = 0x4
    INVALID_PARAMETER = 0x5
    ACCESS_DENIED = 0x6
    INVALID_PARTITION_STATE = 0x7
    INSUFFICIENT_MEMORY = 0xB
    INVALID_CONNECTION_ID = 0x12
    INSUFFICIENT_BUFFERS = 0x13


FAST_BIT: Final = 1 << 16
REP_COUNT_SHIFT: Final = 32


def control_word(code: int, *, fast: bool = False, rep_count: int = 0) -> int:
    """The 64-bit hypercall input value: code bits 0-15, fast bit 16, rep count 32-43."""
    return (code & 0xFFFF) | (FAST_BIT if fast else 0) | ((rep_count & 0xFFF) << REP_COUNT_SHIFT)


def split_control_word(value: int) -> tuple[int, bool, int]:
    return value & 0xFFFF, bool(value & FAST_BIT), (value >> REP_COUNT_SHIFT) & 0xFFF


# struct hv_input_post_message: connection id, reserved, message type,
# payload size, 240 payload bytes.
POST_MESSAGE_INPUT: Final = struct.Struct("<IIII240s")
MESSAGE_PAYLOAD_MAX: Final = 240
VMBUS_MESSAGE_TYPE: Final = 1

# HvSignalEvent's 8-byte fast input: connection id, flag number, reserved.
SIGNAL_EVENT_INPUT: Final = struct.Struct("<IHH")

# Connection ids (hyperv_vmbus.h).
VMBUS_MESSAGE_CONNECTION_ID: Final = 1
VMBUS_MESSAGE_CONNECTION_ID_4: Final = 4
VMBUS_MESSAGE_SINT: Final = 2

# SynIC: struct hv_message, 256 bytes; 16 slots per message page.
HV_MESSAGE_SIZE: Final = 256
SYNIC_MESSAGE_HEADER: Final = struct.Struct("<IBBHQ")  # type, payload size, flags, reserved, sender
MSG_FLAG_PENDING: Final = 0x1
HVMSG_NONE: Final = 0
# Event flags page: 256 bytes (2048 bits) per SINT.
EVENT_FLAGS_BYTES_PER_SINT: Final = 256

# Synthetic MSRs the guest writes (each write is an exit).
HV_X64_MSR_SIEFP: Final = 0x40000082
HV_X64_MSR_SIMP: Final = 0x40000083
HV_X64_MSR_EOM: Final = 0x40000084
MSR_ENABLE: Final = 0x1

# Event flag the emulated (non-VMBus) disk controllers raise as their
# interrupt line; VMBus relids stay far below it.
LEGACY_IRQ_FLAG: Final = EVENT_FLAGS_BYTES_PER_SINT * 8 - 1
