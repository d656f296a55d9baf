"""Presenters: the guest kernel's devices shown to unmodified programs
through Linux's own interfaces (a FUSE file per disk; see ``fuse_disk``),
and the real program run among them (``command``)."""
