"""Host devices (VSPs) and the real I/O behind them: disk images, sockets,
network devices.  Imports ``ring`` and ``vmbus``; never ``guest_kernel``.

Not built yet: it follows the bus.
"""
