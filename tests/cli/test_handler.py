"""The top-level handler of ``pvbus``, in process: what reaches ``main``
unforeseen becomes one line (groups read as the exceptions inside them),
``--debug`` lets it through, Ctrl-C is status 130 without a word."""

from __future__ import annotations

import argparse

import pytest

from pvbus import cli
from pvbus.errors import CommandError, UsageError


def _with_command(monkeypatch: pytest.MonkeyPatch, raised: BaseException) -> None:
    def command(args: argparse.Namespace) -> int:
        raise raised

    monkeypatch.setattr(cli, "_cmd_inspect", command)


def _main(monkeypatch: pytest.MonkeyPatch, raised: BaseException, *options: str) -> int:
    _with_command(monkeypatch, raised)
    return cli.main([*options, "inspect", "--socket", "s"])


def test_an_exception_group_reads_as_its_leaves(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    group = ExceptionGroup("trio", [ExceptionGroup("inner", [ValueError("the real problem")])])
    assert _main(monkeypatch, group) == 1
    err = capsys.readouterr().err
    assert err == "pvbus: error: ValueError: the real problem (run with --debug for the traceback)\n"


def test_a_command_error_inside_a_group(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    group = BaseExceptionGroup("trio", [CommandError("the host went away (it closed the control socket)")])
    assert _main(monkeypatch, group) == 1
    assert capsys.readouterr().err == "pvbus inspect: the host went away (it closed the control socket)\n"


def test_a_usage_error_is_status_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(monkeypatch, UsageError("no such thing")) == 2
    assert capsys.readouterr().err == "pvbus inspect: error: no such thing\n"


@pytest.mark.parametrize("raised", [KeyboardInterrupt(), BaseExceptionGroup("trio", [KeyboardInterrupt()])])
def test_ctrl_c_is_130_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               raised: BaseException) -> None:
    assert _main(monkeypatch, raised) == 130
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_debug_lets_the_exception_through(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ExceptionGroup):
        _main(monkeypatch, ExceptionGroup("trio", [ValueError("shown with its traceback")]), "--debug")


def test_a_system_exit_keeps_its_status(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exit_:
        _main(monkeypatch, SystemExit(4))
    assert exit_.value.code == 4
