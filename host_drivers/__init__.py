"""Host devices (VSPs) and the real I/O behind them: echo, the storage
device on a disk image (SCSI, with a C path serving requests straight from
the ring) and the emulated IDE and DMA controllers.  Imports ``ring`` and
``vmbus``; never ``guest_kernel``.
"""
