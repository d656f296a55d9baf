"""The DMA driver as machine code in a KVM vCPU: the bytes it moves, its
exits by reason, its interrupts, and the fallback when KVM is turned off."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pvbus.bench import guestbin, kvm
from pvbus.bench.blockload import Workload

ok, why = kvm.available()
pytestmark = pytest.mark.skipif(not ok, reason=why)


@pytest.fixture
def machine() -> Iterator[guestbin.GuestMachine]:
    try:
        m = guestbin.GuestMachine()
    except guestbin.GuestCodeUnavailable as exc:
        pytest.skip(str(exc))
    yield m
    m.close()


def copy(machine: guestbin.GuestMachine, image: str, size: int, write: bool,
         use_irq: bool = True) -> tuple[dict, kvm.Vcpu]:
    import dataclasses

    vcpu = kvm.Vcpu(machine)
    job = dataclasses.replace(guestbin.copy_job(size, 65536, write), use_irq=use_irq)
    try:
        return trio.run(lambda: guestbin.run_job(machine, image, job, vcpu.run, writable=write)), vcpu
    finally:
        vcpu.close()


def test_reads_the_image_byte_for_byte(machine: guestbin.GuestMachine, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(2 << 20))
    res, vcpu = copy(machine, str(image), 2 << 20, write=False)
    assert res["finished"] == 1 and res["errors"] == 0 and res["requests"] == 32
    assert res["capacity"] == (2 << 20) // 512
    got = hashlib.sha256(machine.memory.view(guestbin.BUFFER_GPA, 2 << 20)).hexdigest()
    assert got == hashlib.sha256(image.read_bytes()).hexdigest()
    # seven register accesses per request, the capacity read and the power-off
    assert vcpu.exits["MMIO"] == 32 * 7 + 2
    assert res["interrupts"] == vcpu.injected == 32  # one injected interrupt per request, taken by the guest


def test_writes_the_image_byte_for_byte(machine: guestbin.GuestMachine, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    data = os.urandom(1 << 20)
    machine.load(guestbin.BUFFER_GPA, data)
    res, _ = copy(machine, str(image), 1 << 20, write=True, use_irq=False)
    assert res["errors"] == 0 and res["interrupts"] == 0  # polling: the line stays masked
    assert hashlib.sha256(image.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_record_counts_exits_by_reason(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    rec = kvm.run_block(str(image), Workload("randread", 4096, 1, 1 << 20, 0.2, 0.05))
    assert rec["mode"] == "fullvirt" and rec["mechanism"].startswith("KVM")
    assert rec["exits_by_reason"]["MMIO"] >= 7 * rec["ios"]
    assert rec["exits_per_io"] == pytest.approx(7, abs=0.5)
    assert rec["interrupts_per_io"] == pytest.approx(1, abs=0.1)


def test_compute_matches_native_and_prints_the_ratio(machine: guestbin.GuestMachine) -> None:
    data = os.urandom(8 << 20)
    machine.load(guestbin.BUFFER_GPA, data)
    total, seconds, exits = kvm.run_compute(machine, len(data))
    native = guestbin.native_checksum()
    import time

    t0 = time.perf_counter()
    assert native(machine.memory.c_address + guestbin.BUFFER_GPA, len(data) // 8) == total
    native_s = time.perf_counter() - t0
    assert exits == {"MMIO": 1}  # the compute runs without a single exit but the power-off
    print(f"checksum of 8 MiB: native {native_s * 1e3:.1f} ms, KVM {seconds * 1e3:.1f} ms "
          f"(KVM/native {seconds / native_s:.2f}x)")


def test_fallback_when_kvm_is_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVBUS_NO_KVM", "1")
    usable, reason = kvm.available()
    assert not usable and "PVBUS_NO_KVM" in reason
    with pytest.raises(kvm.KvmUnavailable):
        kvm.Vcpu(None)  # type: ignore[arg-type]


def test_bench_plan_labels_the_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from pvbus.bench import hwkinds

    monkeypatch.setenv("PVBUS_NO_KVM", "1")
    monkeypatch.setenv("PVBUS_NO_EMULATOR", "1")
    real, missing = hwkinds.plan()
    assert real == {}
    assert "PVBUS_NO_KVM" in missing["fullvirt"] and "PVBUS_NO_EMULATOR" in missing["emulated"]
    monkeypatch.delenv("PVBUS_NO_KVM")
    real, missing = hwkinds.plan()
    assert real["fullvirt"][1].startswith("KVM") and "fullvirt" not in missing
