"""Wire formats of devices, one module per device, shared by both halves."""
