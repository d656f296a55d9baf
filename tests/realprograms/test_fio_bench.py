"""``pvbus bench block --fio``: fio, the real tool, in a guest on
``/dev/pvbus/disk0`` and natively, read into the same records.

Short runs: the records' shape and that real I/O was done (positive rates
for every job, both sides), not the speed (that is the benchmark's job).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pvbus.bench import blockbench

from .helpers import skip_unless_ready

SIZE = 16 << 20


def test_fio_in_a_guest_and_natively_give_one_record_per_job(tmp_path: Path) -> None:
    skip_unless_ready("fio")
    image = str(tmp_path / "disk.img")
    blockbench.lay_out(image, SIZE)
    command = blockbench.fio_command(image, SIZE, 0.2, ramp=0)
    native = subprocess.run(command, capture_output=True, check=True, timeout=120)
    records = blockbench.fio_records(json.loads(native.stdout), "native-fio")
    records += blockbench.run_fio_in_guest(image, SIZE, 0.2, ramp=0)
    jobs = [(rw, bs, qd) for rw, bs, qd in blockbench.FIO_JOBS]
    for mode in ("native-fio", "guest-fio"):
        mine = [r for r in records if r["mode"] == mode]
        assert [(r["rw"], r["bs"], r["iodepth"]) for r in mine] == jobs
        assert all(r["iops"] > 0 and r["mb_per_s"] > 0 for r in mine), mine
    targets = blockbench.evaluate_fio(records)
    assert [t["target"].split(" in a guest")[0] for t in targets] == [
        "fio seq 1 MiB read QD1", "fio seq 1 MiB read QD32", "fio rand 4 KiB read QD32"]
