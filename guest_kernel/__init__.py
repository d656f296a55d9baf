"""The modified ("enlightened") guest kernel: guest RAM (a sealed memfd and
a page allocator), hypercall stubs, the SynIC message slot and event flags,
boot, and the guest drivers in ``guest_kernel.drivers``: the paravirtual
ones (VSCs: echo, and storvsc with its C request builder and completion
decoder) and the unmodified IDE and DMA drivers of the emulated disks.
Imports ``ring`` and ``vmbus``.
"""
