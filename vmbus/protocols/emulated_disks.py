"""Where the emulated disk controllers sit: their register windows.

Shared by the host's device models (``host_drivers.emulated``) and the
guest drivers an unmodified OS would have (``guest_kernel.drivers.ide``,
``.dmadisk``), as a paravirtual device's two halves share a protocol
module.  The registers inside each window are described by the models.
"""

from __future__ import annotations

from typing import Final

IDE_BASE: Final = 0x1F0  # the legacy primary IDE task file
IDE_PORTS: Final = 8
DMA_BASE: Final = 0x1000
DMA_REGS: Final = 0x40  # eight 8-byte registers
