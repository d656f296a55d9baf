"""pvbus: paravirtual I/O in user space, modelled on Hyper-V's VMBus.

This package holds what sits above the layers: the ``pvbus`` command line
and the benchmarks.  The layers themselves are the top-level packages
``ring`` (shared-memory rings, C core), ``vmbus`` (the bus),
``guest_kernel`` and ``host_drivers``.
"""

__version__ = "0.1.0"
