"""The same guest code under the CPU emulator: the bytes it moves, the
checksum on x86-64 and on an emulated aarch64, and the fallback."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pvbus.bench import emulator, guestbin, kvm
from pvbus.bench.blockload import Workload

ok, why = emulator.available()
pytestmark = pytest.mark.skipif(not ok, reason=why)


@pytest.fixture
def machine() -> Iterator[guestbin.GuestMachine]:
    try:
        m = guestbin.GuestMachine()
    except guestbin.GuestCodeUnavailable as exc:
        pytest.skip(str(exc))
    yield m
    m.close()


@pytest.mark.parametrize("write", [False, True])
def test_moves_the_image_byte_for_byte(machine: guestbin.GuestMachine, tmp_path: Path, write: bool) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    data = os.urandom(1 << 20)
    if write:
        machine.load(guestbin.BUFFER_GPA, data)
    emu = emulator.X86Emulator(machine)
    job = guestbin.copy_job(1 << 20, 65536, write)
    res = trio.run(lambda: guestbin.run_job(machine, str(image), job, emu.run, writable=write))
    assert res["finished"] == 1 and res["errors"] == 0 and res["requests"] == 16
    expected = hashlib.sha256(data if write else image.read_bytes()).digest()
    got = image.read_bytes() if write else machine.memory.view(guestbin.BUFFER_GPA, 1 << 20)
    assert hashlib.sha256(got).digest() == expected
    assert emu.accesses == 16 * 7 + 1  # seven register accesses a request and the capacity
    assert emu.hooks == 2 * (emu.accesses + 1)  # each 8-byte access (and the power-off) in two halves


def test_foreign_architecture_gives_the_same_checksum(machine: guestbin.GuestMachine) -> None:
    data = os.urandom(4 << 20)
    machine.load(guestbin.BUFFER_GPA, data)
    x86, _ = emulator.run_compute(machine, len(data))
    try:
        arm, _ = emulator.run_compute_aarch64(machine, len(data))
    except guestbin.GuestCodeUnavailable as exc:
        pytest.skip(str(exc))
    assert arm == x86 == guestbin.checksum_reference(data)


def test_compute_ratio_native_kvm_emulated(machine: guestbin.GuestMachine) -> None:
    data = os.urandom(8 << 20)
    machine.load(guestbin.BUFFER_GPA, data)
    emulated, emu_s = emulator.run_compute(machine, len(data))
    t0 = time.perf_counter()
    native = guestbin.native_checksum()(machine.memory.c_address + guestbin.BUFFER_GPA, len(data) // 8)
    native_s = time.perf_counter() - t0
    assert emulated == native
    line = f"checksum of 8 MiB: native {native_s * 1e3:.1f} ms, emulated {emu_s * 1e3:.1f} ms"
    if kvm.available()[0]:
        in_kvm, kvm_s, _ = kvm.run_compute(machine, len(data))
        assert in_kvm == native
        line += f", KVM {kvm_s * 1e3:.1f} ms (emulated/KVM {emu_s / kvm_s:.2f}x)"
    print(line + f" (emulated/native {emu_s / native_s:.2f}x)")


def test_block_record_names_the_mechanism(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    rec = emulator.run_block(str(image), Workload("randread", 4096, 1, 1 << 20, 0.2, 0.05))
    assert rec["mode"] == "emulated" and rec["mechanism"].startswith("unicorn")
    assert rec["exits_per_io"] == pytest.approx(14, abs=0.5)  # hook calls: two halves per register access


def test_fallback_when_the_emulator_is_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVBUS_NO_EMULATOR", "1")
    usable, reason = emulator.available()
    assert not usable and "PVBUS_NO_EMULATOR" in reason
    with pytest.raises(emulator.EmulatorUnavailable):
        emulator.X86Emulator(dataclasses.replace)  # type: ignore[arg-type]
