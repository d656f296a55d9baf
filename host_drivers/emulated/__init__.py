"""Emulated disk controllers for guests without VMBus drivers.

They exist to measure what paravirtualization saves.  Each register access
of the guest's driver is a trapped exit (``ExitKind.IO``) answered by the
device model here, one round trip each:

- ``ide.IdePio``: a legacy IDE-like task file driven by programmed I/O;
  every 16-bit data word crosses as its own exit (hardware emulation).
- ``dma.DmaDisk``: a simple DMA disk controller; a request is a handful of
  register writes, a doorbell, an interrupt and its acknowledgement, with
  the data moved by DMA straight into guest RAM (full virtualization).

Both read and write the same disk image as the paravirtual disk.
"""

from vmbus.protocols.emulated_disks import DMA_BASE as DMA_BASE
from vmbus.protocols.emulated_disks import DMA_REGS as DMA_REGS
from vmbus.protocols.emulated_disks import IDE_BASE as IDE_BASE
from vmbus.protocols.emulated_disks import IDE_PORTS as IDE_PORTS
