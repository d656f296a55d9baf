"""The sockets device's host half: guest connections to host services, and
host programs' connections to guests' listening ports (hv_sock)."""
