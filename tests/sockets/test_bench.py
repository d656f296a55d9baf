"""``pvbus bench sockets --quick`` end to end: both transports move data
that the sink counts and checksums as the client sent it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pvbus.bench.sockbench import expected_crc


def test_bench_sockets_quick_writes_both_transports_with_matching_checksums(tmp_path: Path) -> None:
    out = tmp_path / "results" / "sockets.json"
    done = subprocess.run([sys.executable, "-m", "pvbus", "bench", "sockets", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    records = {r["transport"]: r for r in result["records"]}
    assert set(records) == {"loopback-tcp", "sockets-device"}
    for record in records.values():
        assert record["write_size"] == 64 << 10
        assert record["bytes_sent"] > 0 and record["bytes_sent"] % (64 << 10) == 0
        assert record["bytes_received"] == record["bytes_sent"]
        assert record["crc32_received"] == record["crc32_sent"] == expected_crc(record["bytes_sent"] >> 16)
        assert record["data_ok"] is True and record["mb_per_s"] > 0
        assert record["rr"]["round_trips"] > 0 and record["rr"]["mismatches"] == 0
        assert 0 < record["rr"]["p50_us"] <= record["rr"]["p99_us"]
    (stream_target, _) = result["targets"]
    device, tcp = records["sockets-device"], records["loopback-tcp"]
    assert stream_target["ratio"] == device["mb_per_s"] / tcp["mb_per_s"]
    assert "sockets-device" in done.stdout and "loopback-tcp" in done.stdout
