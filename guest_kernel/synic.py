"""The guest's synthetic interrupt controller: message slot and event flags.

Two pages of guest RAM registered with the hypervisor by MSR writes: the
SIMP page, whose slot for SINT 2 receives VMBus messages, and the SIEFP
page, whose SINT 2 block has one bit per channel relid.  One eventfd is
the SINT line.  ``run`` is the interrupt handler: on every SINT it

1. takes the message in the slot, if any: copies all 256 bytes into
   private memory first (the host could rewrite it), clears
   message_type, then reads msg_pending and writes the EOM MSR if set, so
   the hypervisor delivers the next queued message;
2. swaps every non-zero 64-bit word of the event flags with 0 and wakes
   the channels whose bits were set.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from ring import Doorbell
from vmbus import hv

from .hypercalls import Hypercalls
from .memory import PAGE_SHIFT, GuestRam

log = logging.getLogger(__name__)
SLOT = hv.VMBUS_MESSAGE_SINT * hv.HV_MESSAGE_SIZE
FLAGS = hv.VMBUS_MESSAGE_SINT * hv.EVENT_FLAGS_BYTES_PER_SINT
FLAG_WORDS = hv.EVENT_FLAGS_BYTES_PER_SINT // 8


class SynIC:
    def __init__(self, ram: GuestRam, hypercalls: Hypercalls, sint: Doorbell) -> None:
        self.ram = ram
        self.hypercalls = hypercalls
        self.sint = sint
        self.simp = ram.alloc(1) << PAGE_SHIFT
        self.siefp = ram.alloc(1) << PAGE_SHIFT
        self.interrupts = 0
        self.messages = 0
        self.on_message: Callable[[bytes], None] = lambda data: None
        self.on_channel: Callable[[int], None] = lambda relid: None

    async def enable(self) -> None:
        await self.hypercalls.wrmsr(hv.HV_X64_MSR_SIMP, self.simp | hv.MSR_ENABLE)
        await self.hypercalls.wrmsr(hv.HV_X64_MSR_SIEFP, self.siefp | hv.MSR_ENABLE)

    async def run(self) -> None:
        while True:
            await self.sint.wait()
            self.interrupts += 1
            await self.drain()

    async def drain(self) -> None:
        ram = self.ram
        slot = self.simp + SLOT
        while ram.load32(slot) != hv.HVMSG_NONE:
            raw = bytes(ram.view[slot : slot + hv.HV_MESSAGE_SIZE])  # private copy first
            _, size, _, _, _ = hv.SYNIC_MESSAGE_HEADER.unpack_from(raw)
            ram.store32(slot, hv.HVMSG_NONE)  # seq_cst: then read msg_pending
            pending = (ram.load32(slot + 4) >> 8) & hv.MSG_FLAG_PENDING
            self.messages += 1
            self.on_message(raw[16 : 16 + min(size, hv.MESSAGE_PAYLOAD_MAX)])
            if pending:
                await self.hypercalls.wrmsr(hv.HV_X64_MSR_EOM, 0)
        for word in range(FLAG_WORDS):
            gpa = self.siefp + FLAGS + 8 * word
            if not struct.unpack_from("<Q", ram.view, gpa)[0]:
                continue
            bits = ram.xchg64(gpa, 0)
            while bits:
                low = bits & -bits
                self.on_channel(word * 64 + low.bit_length() - 1)
                bits ^= low

    def close(self) -> None:
        self.sint.close()
