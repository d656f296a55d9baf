"""Coverage-guided fuzzing of every parser of guest input (atheris/libFuzzer).

One module per target under ``fuzz.targets``; each exposes ``seeds()``
(valid inputs built with the project's own encoders, written out as the
seed corpus at every run) and ``test_one_input(data)``, which feeds the
bytes to a real host component and checks invariants, not only that
nothing crashed: which exceptions may escape, which statuses may come
back, which bytes of guest RAM or of the disk image may change, and that
accepted messages re-encode to the bytes they came from.

``python -m fuzz run TARGET [libFuzzer flags] [crash files]`` runs one
target (or replays inputs); ``python -m fuzz all --seconds N`` runs each
in turn and prints a summary.  Working corpora and crash artifacts live
under ``fuzz/work/`` (not versioned).

This package imports nothing of the project at import time: the runner
imports a target inside atheris' instrumentation so the project's modules
are compiled with coverage hooks.
"""

TARGETS = (
    "control",
    "hypercall",
    "gpadl",
    "storvsp",
    "storvsp_fast",
    "emulated",
    "admin",
    "ic",
    "hvsock",
    "netvsc",
)
