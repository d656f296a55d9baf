"""A random block workload through the real guest driver and host process,
checked against a model of the disk: 100,000 operations (read, write,
flush, discard; 512 B to 1 MiB; up to 64 in flight; four queues), zero
mismatches.  Then durability: data written and flushed survives SIGKILL
of the host, 50 times."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from guest_kernel.drivers.storvsc import BlockRequest

from ..bus.harness import PVBUS, host_process
from .helpers import run_guest

DISK = 64 << 20
BS = 512


def _size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.75:
        return rng.randint(1, 16) * BS  # 512 B .. 8 KiB
    if roll < 0.99:
        return rng.randint(17, 256) * BS  # .. 128 KiB
    return rng.randint(257, 2048) * BS  # .. 1 MiB


def _batch(rng: random.Random, depth: int) -> list[BlockRequest]:
    """Up to ``depth`` requests in flight together: writes and discards never
    overlap anything else in the batch, so the outcome is defined."""
    taken: list[tuple[int, int]] = []
    reqs: list[BlockRequest] = []
    pool = os.urandom(1 << 20)
    for _ in range(depth):
        kind = rng.choices(["read", "write", "flush", "discard"], [45, 45, 3, 7])[0]
        if kind == "flush":
            reqs.append(BlockRequest("flush"))
            continue
        n = _size(rng)
        off = rng.randrange(0, (DISK - n) // BS + 1) * BS
        if any(off < e and s < off + n for s, e in taken):
            continue
        taken.append((off, off + n))
        if kind == "write":
            start = rng.randrange(0, len(pool) - n + 1)
            reqs.append(BlockRequest("write", off, data=pool[start : start + n], fua=rng.random() < 0.05))
        else:
            reqs.append(BlockRequest(kind, off, n))
    return reqs


@pytest.mark.timeout(600)  # about 25 s alone, four times that on a loaded machine
def test_random_workload_against_model(tmp_path: Path) -> None:
    with host_process(tmp_path, "--disk", str(tmp_path / "disk.img"), "--disk-size", str(DISK)) as host:

        async def body(kernel) -> dict[str, int]:  # noqa: ANN001
            disk = kernel.device("storage")
            assert disk.capacity == DISK and len(disk.queues) == 4
            model = bytearray(DISK)
            rng = random.Random(2026)
            counts = {"ops": 0, "mismatches": 0, "read": 0, "write": 0, "flush": 0, "discard": 0}
            while counts["ops"] < 100_000:
                reqs = _batch(rng, rng.choice([1, 4, 16, 32, 64]))
                results = await disk.submit(reqs)
                for req, res in zip(reqs, results, strict=True):
                    assert res.error is None, res.error
                    counts[req.op] += 1
                    if req.op == "read":
                        counts["mismatches"] += res.data != model[req.offset : req.offset + req.length]
                for req in reqs:
                    if req.op == "write":
                        model[req.offset : req.offset + len(req.data)] = req.data
                    elif req.op == "discard":
                        model[req.offset : req.offset + req.length] = bytes(req.length)
                counts["ops"] += len(reqs)
            # finally every byte of the disk, through the driver
            for off in range(0, DISK, 1 << 20):
                counts["mismatches"] += await disk.read(off, 1 << 20) != model[off : off + (1 << 20)]
            return counts

        counts = run_guest(host.socket, body)
    print(counts)
    assert counts["ops"] >= 100_000 and counts["mismatches"] == 0
    assert min(counts[k] for k in ("read", "write", "flush", "discard")) > 1000


@pytest.mark.timeout(600)  # fifty host processes started and killed
def test_flushed_data_survives_host_sigkill(tmp_path: Path) -> None:
    image = tmp_path / "durable.img"
    rng = random.Random(7)
    expected: dict[int, bytes] = {}
    for trial in range(50):
        sock = str(tmp_path / f"h{trial}.sock")
        proc = subprocess.Popen([*PVBUS, "host", "--socket", sock, "--disk", str(image), "--disk-size", "8M",
                                 "--device", "storage"], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
            off = rng.randrange(0, (8 << 20) // 4096) * 4096
            data = os.urandom(rng.choice([4096, 65536]))
            if off + len(data) > 8 << 20:
                off = (8 << 20) - len(data)

            acknowledged: list[int] = []

            async def body(kernel, off=off, data=data, trial=trial, acknowledged=acknowledged, proc=proc) -> None:  # noqa: ANN001
                disk = kernel.device("storage")
                if trial % 2:
                    await disk.write(off, data, fua=True)  # FUA: durable on completion
                else:
                    await disk.write(off, data)
                    await disk.flush()
                acknowledged.append(off)
                proc.send_signal(signal.SIGKILL)  # no clean shutdown of anything on the host

            try:
                run_guest(sock, body, ram_mib=16)
            except Exception:  # noqa: BLE001 - the guest's shutdown meets a dead host
                pass
            proc.wait(timeout=10)
            assert acknowledged == [off], "the write was not acknowledged before the kill"
            for o in [k for k in expected if k < off + len(data) and off < k + len(expected[k])]:
                del expected[o]  # overwritten ranges: the newest write wins
            expected[off] = data
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with open(image, "rb") as f:  # the image reopened, every surviving write checked
            for o, d in expected.items():
                f.seek(o)
                assert f.read(len(d)) == d, f"trial {trial}: data at {o} lost"
    assert len(expected) >= 10
