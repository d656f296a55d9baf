"""Running fuzz targets: one target in this process, or all of them in turn.

``run`` imports the target inside ``atheris.instrument_imports`` (only the
project's packages get coverage hooks; trio and the standard library do
not), writes the target's seeds to ``<work>/<target>/seeds`` and hands
libFuzzer the growing corpus ``<work>/<target>/corpus`` plus the seeds.
Crash, timeout and out-of-memory inputs land in ``<work>/<target>/crashes/``.
Any libFuzzer flag or input file given after the target name is passed on,
so ``python -m fuzz run control fuzz/work/control/crashes/crash-...``
replays one input.

``all`` runs every target (or the ones named) for ``--seconds`` each in a
child process and prints one line per target: executions, coverage
(``cov``: edges, ``ft``: features, as libFuzzer counts them), corpus size
and crashes.  It exits non-zero if any target crashed, hung, ran out of
memory, or did not finish.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz import TARGETS

WORK = Path(__file__).resolve().parent / "work"
# What gets coverage hooks: the host's code and the ring it parses.
INSTRUMENTED = ["vmbus", "host_drivers", "ring", "pvbus"]
TIMEOUT_S = 10  # one input taking longer than this is a hang
RSS_LIMIT_MB = 1536
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def _target_module(name: str):  # noqa: ANN202 - a module
    if name not in TARGETS:
        raise SystemExit(f"unknown fuzz target {name!r}; known: {', '.join(TARGETS)}")
    return importlib.import_module(f"fuzz.targets.{name}")


def write_seeds(name: str, module, directory: Path) -> int:  # noqa: ANN001
    """The target's seed inputs as files (named by index: stable, readable)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    seeds = list(module.seeds())
    for i, seed in enumerate(seeds):
        (directory / f"seed-{i:03d}").write_bytes(seed)
    return len(seeds)


def run_one(name: str, extra: list[str], work: Path) -> None:
    """Fuzz ``name`` in this process (never returns normally on a crash:
    libFuzzer exits with the crash reported and the input saved)."""
    import atheris

    logging.disable(logging.CRITICAL)  # the host logs every refusal; at 1000s of inputs a second that is noise
    with atheris.instrument_imports(include=INSTRUMENTED):
        module = _target_module(name)
    base = work / name
    corpus, seeds, crashes = base / "corpus", base / "seeds", base / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    inputs = [a for a in extra if not a.startswith("-")]
    flags = [a for a in extra if a.startswith("-")]
    if not inputs:  # fuzzing, not replaying: corpus first (new inputs go there), then the seeds
        write_seeds(name, module, seeds)
        inputs = [str(corpus), str(seeds)]
    defaults = {"-timeout": str(TIMEOUT_S), "-rss_limit_mb": str(RSS_LIMIT_MB),
                "-artifact_prefix": f"{crashes}/", "-print_final_stats": "1", "-max_len": "4096"}
    given = {f.split("=", 1)[0] for f in flags}
    argv = [f"fuzz-{name}", *(f"{k}={v}" for k, v in defaults.items() if k not in given), *flags, *inputs]
    atheris.Setup(argv, module.test_one_input)
    atheris.Fuzz()


@dataclass
class Summary:
    target: str
    returncode: int
    execs: int = 0
    cov: int = 0
    features: int = 0
    corpus: int = 0
    crashes: int = 0
    seconds: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.crashes == 0


STAT = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.M)
FINAL = re.compile(r"^stat::number_of_executed_units:\s*(\d+)", re.M)


def parse_output(target: str, returncode: int, text: str, crashes: Path, seconds: float) -> Summary:
    """libFuzzer's progress lines and final stats to one summary."""
    s = Summary(target, returncode, seconds=seconds)
    stats = STAT.findall(text)
    if stats:
        execs, cov, ft, corp = (int(x) for x in stats[-1])
        s.execs, s.cov, s.features, s.corpus = execs, cov, ft, corp
    final = FINAL.findall(text)
    if final:
        s.execs = int(final[-1])
    if crashes.is_dir():
        s.crashes = sum(1 for p in crashes.iterdir() if p.name.startswith(ARTIFACT_PREFIXES))
    if returncode != 0:
        line = next((ln for ln in text.splitlines() if "ERROR:" in ln or "Uncaught Python exception" in ln
                     or "ALARM:" in ln or "out-of-memory" in ln), "")
        s.note = line.strip()[:100] or f"exit status {returncode}"
    return s


def run_all(targets: list[str], seconds: int, work: Path, extra: list[str]) -> list[Summary]:
    summaries = []
    for name in targets:
        base = work / name
        crashes = base / "crashes"
        shutil.rmtree(crashes, ignore_errors=True)  # count only this run's findings
        log = base / "last-run.log"
        base.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fuzz", "run", name, "--work", str(work), "--",
               f"-max_total_time={seconds}", *extra]
        print(f"fuzz: {name} for {seconds} s (log: {log})", flush=True)
        start = time.monotonic()
        with log.open("w") as out:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 300).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        text = log.read_text(errors="replace")
        summary = parse_output(name, rc, text, crashes, time.monotonic() - start)
        if rc == -1:
            summary.note = "did not finish in time (a hang outside libFuzzer's timeout)"
        summaries.append(summary)
    return summaries


def print_summary(summaries: list[Summary]) -> None:
    print(f"\n{'target':<14}{'execs':>10}{'cov':>7}{'ft':>8}{'corpus':>8}{'crashes':>9}{'secs':>7}  result")
    for s in summaries:
        result = "ok" if s.ok else f"FAILED: {s.note}"
        print(f"{s.target:<14}{s.execs:>10}{s.cov:>7}{s.features:>8}{s.corpus:>8}{s.crashes:>9}"
              f"{s.seconds:>7.0f}  {result}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=WORK, help="corpora and crashes (default: fuzz/work)")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="fuzz one target in this process, or replay inputs")
    one.add_argument("target", choices=TARGETS)
    one.add_argument("libfuzzer", nargs=argparse.REMAINDER, help="libFuzzer flags and input files")
    every = sub.add_parser("all", help="run every target in turn and print a summary")
    every.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "600")))
    every.add_argument("--targets", nargs="*", choices=TARGETS, default=list(TARGETS))
    every.add_argument("libfuzzer", nargs=argparse.REMAINDER, help="extra libFuzzer flags for every target")
    seed = sub.add_parser("seeds", help="write every target's seeds under --work and count them")
    seed.add_argument("--targets", nargs="*", choices=TARGETS, default=list(TARGETS))
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in getattr(args, "libfuzzer", []) + rest if a != "--"]
    if args.command == "run":
        run_one(args.target, extra, args.work)
        return 0
    if args.command == "seeds":
        for name in args.targets:
            count = write_seeds(name, _target_module(name), args.work / name / "seeds")
            print(f"{name}: {count} seeds")
        return 0
    summaries = run_all(args.targets, args.seconds, args.work, extra)
    print_summary(summaries)
    return 0 if all(s.ok for s in summaries) else 1
