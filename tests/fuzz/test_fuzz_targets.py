"""Every fuzz target, briefly: its seeds pass its invariants, and a few
seconds of coverage-guided fuzzing (a child process per target, its own
corpus and crash folder) find nothing.  Long runs: ``make fuzz``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import TARGETS

SECONDS = 2
pytest.importorskip("atheris", reason="atheris is not installed (the fuzz extra)")


@pytest.mark.parametrize("name", TARGETS)
def test_seeds_hold_the_invariants(name: str) -> None:
    module = importlib.import_module(f"fuzz.targets.{name}")
    seeds = list(module.seeds())
    assert seeds and all(isinstance(s, bytes) and s for s in seeds)
    for seed in seeds:
        module.test_one_input(seed)


@pytest.mark.parametrize("name", TARGETS)
def test_a_short_fuzz_run_finds_nothing(name: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fuzz", "--work", str(tmp_path), "run", name, "--",
           f"-max_total_time={SECONDS}", "-timeout=20"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 90)
    crashes = sorted(p.name for p in (tmp_path / name / "crashes").iterdir())
    tail = "\n".join(res.stderr.splitlines()[-40:])
    assert res.returncode == 0 and not crashes, f"fuzz target {name} failed; {crashes}\n{tail}"
    assert "Done" in res.stderr and "stat::number_of_executed_units" in res.stderr, tail
    executed = int(res.stderr.split("stat::number_of_executed_units:")[1].split()[0])
    assert executed >= len(list((tmp_path / name / "seeds").iterdir())), "the seeds were not even run"
