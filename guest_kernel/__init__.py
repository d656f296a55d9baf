"""The modified ("enlightened") guest kernel: guest RAM (a sealed memfd and
a page allocator), hypercall stubs, the SynIC message slot and event flags,
boot, and the guest drivers (VSCs).  Imports ``ring`` and ``vmbus``.

Not built yet: it follows the bus.
"""
