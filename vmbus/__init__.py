"""The bus shared by both sides: VMBus control-message layouts, channels
(a ring pair plus doorbells and transaction ids), the hypercall transport,
the host's server and the guest's client state machines, and the
device/driver API with its registry.  Imports ``ring``; never the drivers.
"""
