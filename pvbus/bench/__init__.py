"""Benchmarks: the ring against other ways of moving messages between processes."""
