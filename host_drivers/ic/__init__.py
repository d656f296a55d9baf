"""The integration services' host halves: heartbeat, shutdown, timesync, KVP.

Each is its own device (``pvbus.devices``) on the shared negotiation and
transaction core in ``service``; the wire format is ``vmbus.protocols.ic``.
"""
