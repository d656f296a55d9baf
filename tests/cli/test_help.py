"""Every option and argument of every subcommand says what it is for."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from pvbus.cli import build_parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_action_has_help() -> None:
    missing = []
    seen = 0
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            seen += 1
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subparsers:
            for choice in action._choices_actions:  # the one-line help of each subcommand
                if not choice.help:
                    missing.append(f"{parser.prog} {choice.dest}")
    assert seen > 40  # the walk reached every subcommand
    assert missing == []


def test_every_subcommand_help_prints() -> None:
    for parser in _parsers(build_parser()):
        text = parser.format_help()
        assert parser.prog in text
