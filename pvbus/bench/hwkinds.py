"""The hardware kinds done for real, where this machine allows: which
mechanism runs ``fullvirt`` and ``emulated``, and the compute figures.

- ``fullvirt``: the guest code in a KVM vCPU (``kvm``) when /dev/kvm is
  usable, else the trapped Python model (the guest process's DMA driver
  over the control socket), labelled a fallback with the reason;
- ``emulated``: the guest code under the unicorn CPU emulator
  (``emulator``) when it is installed, else the trapped IDE model, labelled.

``compute`` times one checksum of guest memory natively, in KVM, emulated,
and emulated as aarch64 code, each with its checksum (all equal).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from . import emulator, guestbin, kvm

Runner = Callable[[str, Any], dict[str, Any]]


def plan() -> tuple[dict[str, tuple[Runner, str]], dict[str, str]]:
    """({mode: (runner, mechanism)} for real mechanisms, {mode: why not} for the others)."""
    real: dict[str, tuple[Runner, str]] = {}
    missing: dict[str, str] = {}
    try:
        guestbin.build_dir()
        code_missing = ""
    except guestbin.GuestCodeUnavailable as exc:
        code_missing = str(exc)
    for mode, module in (("fullvirt", kvm), ("emulated", emulator)):
        usable, why = module.available()
        if usable and not code_missing:
            real[mode] = (module.run_block, module.MECHANISM)
        else:
            missing[mode] = why or code_missing
    return real, missing


def run(image: str, workloads: list[Any], progress: Any,
        real: dict[str, tuple[Runner, str]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = []
    for mode, (runner, _) in real.items():
        for wl in workloads:
            if progress:
                progress(f"{mode} {wl.rw} {wl.bs} qd{wl.iodepth}")
            records.append(runner(image, wl))
    return records, {mode: {"mechanism": mechanism, "fallback": None} for mode, (_, mechanism) in real.items()}


def compute(length: int = 32 << 20) -> dict[str, Any]:
    """The checksum of ``length`` random bytes of guest memory by each
    mechanism available: {name: {"seconds", "mb_per_s", "checksum"}} or
    {"skipped": why}; ``ratios`` the emulated/KVM and KVM/native times."""
    out: dict[str, Any] = {"bytes": length}
    try:
        machine = guestbin.GuestMachine()
    except guestbin.GuestCodeUnavailable as exc:
        return {"skipped": str(exc)}
    try:
        machine.load(guestbin.BUFFER_GPA, os.urandom(length))

        def native() -> tuple[int, float]:
            fn = guestbin.native_checksum()
            t0 = time.perf_counter()
            return int(fn(machine.memory.c_address + guestbin.BUFFER_GPA, length // 8)), time.perf_counter() - t0

        runs: dict[str, Callable[[], tuple[int, float]]] = {
            "native": native,
            "kvm": lambda: kvm.run_compute(machine, length)[:2],
            "emulated": lambda: emulator.run_compute(machine, length),
            "emulated-aarch64": lambda: emulator.run_compute_aarch64(machine, length),
        }
        for name, fn in runs.items():
            try:
                total, seconds = fn()
            except (kvm.KvmUnavailable, emulator.EmulatorUnavailable, guestbin.GuestCodeUnavailable) as exc:
                out[name] = {"skipped": str(exc)}
                continue
            out[name] = {"seconds": seconds, "mb_per_s": length / seconds / 1e6, "checksum": f"{total:016x}"}
    finally:
        machine.close()
    sums = {v["checksum"] for v in out.values() if isinstance(v, dict) and "checksum" in v}
    out["checksums_agree"] = len(sums) == 1
    t = {k: out[k]["seconds"] for k in ("native", "kvm", "emulated") if "seconds" in out.get(k, {})}
    out["ratios"] = {f"{a}/{b}": t[a] / t[b] for a, b in (("emulated", "kvm"), ("kvm", "native"),
                                                          ("emulated", "native")) if a in t and b in t}
    return out
