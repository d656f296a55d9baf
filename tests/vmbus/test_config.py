"""Device configuration: declared as a dataclass, checked and converted once."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmbus.config import REQUIRED, ConfigError, Size, build_config, describe_options, option, parse_device_argument


@dataclass(frozen=True)
class Demo:
    path: str = option("where", REQUIRED)
    fast: bool = option("go fast", False)
    depth: int | None = option("queue depth")
    chunk: Size | None = option("bytes per chunk")
    ratio: float = option("a ratio", 0.5)


def test_arguments_parse_into_name_and_options() -> None:
    assert parse_device_argument("storage") == ("storage", {})
    assert parse_device_argument("storage:path=/a b.img, read_only=yes") == (
        "storage", {"path": "/a b.img", "read_only": "yes"})
    for bad in (":x=1", "storage:path", "storage:=1", "storage:a=1,a=2"):
        with pytest.raises(ConfigError):
            parse_device_argument(bad)


def test_values_are_converted_by_declared_type_and_unset_ones_left_to_the_device() -> None:
    built = build_config("demo", Demo, {"path": "x", "fast": "yes", "chunk": "64k", "ratio": "0.25"})
    assert built == {"path": "x", "fast": True, "chunk": 65536, "ratio": 0.25}  # depth absent: device default
    assert build_config("demo", Demo, {"path": "x", "depth": 4})["depth"] == 4  # from code: typed values pass


@pytest.mark.parametrize(("given", "words"), [
    ({}, "needs option path"),
    ({"path": "x", "nope": "1"}, "has no option nope; its options: path, fast, depth, chunk, ratio"),
    ({"path": "x", "fast": "maybe"}, "option fast takes yes or no, not 'maybe'"),
    ({"path": "x", "depth": "four"}, "option depth takes a whole number"),
    ({"path": "x", "chunk": "1X"}, "option chunk takes a size"),
    ({"path": "x", "depth": True}, "option depth takes a whole number"),  # a bool is not a number
    ({"path": 7}, "option path takes text"),
])
def test_bad_options_are_refused_in_words(given: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match="device demo") as caught:
        build_config("demo", Demo, given)
    assert words in str(caught.value)


def test_a_device_without_a_schema_gets_what_it_was_given() -> None:
    assert build_config("echo", None, {"anything": 1}) == {"anything": 1}


def test_options_are_described_for_the_user() -> None:
    lines = describe_options(Demo)
    assert lines[0] == "path=<text>: where (required)"
    assert lines[1] == "fast=<yes or no>: go fast (default False)"
    assert lines[3] == "chunk=<a size such as 4096, 64k or 1M>: bytes per chunk"


@pytest.mark.parametrize(("device", "words"), [
    ("storage:path=/tmp/x.img,bogus=1", "device storage has no option bogus"),
    ("storage:read_only=yes", "device storage needs option path"),
    ("heartbeat:interval=soon", "device heartbeat: option interval takes a number, not 'soon'"),
    ("echo:depth=3", "device echo takes no options"),
    ("nosuch", "unknown device nosuch"),
])
def test_the_host_refuses_bad_device_options_in_one_line(tmp_path: Path, device: str, words: str) -> None:
    res = subprocess.run([sys.executable, "-m", "pvbus", "host", "--socket", str(tmp_path / "h.sock"),
                          "--device", device], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert not (tmp_path / "h.sock").exists()


def test_devices_lists_every_option() -> None:
    res = subprocess.run([sys.executable, "-m", "pvbus", "devices"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "storage: " in res.stdout and "    path=<text>: disk image or block device" in res.stdout
    assert "ide (trapped, --emulated-disks)" in res.stdout
