"""What a command tells its user when it cannot do its job.

A command that finds a problem raises one of these with one line naming
the problem and, where there is one, the fix; the top-level handler in
``pvbus.cli`` prints that line alone (a traceback only with ``--debug``).
``UsageError`` is for a command line that asks for something impossible
(exit status 2, as argparse gives); ``CommandError`` for a failure while
running (exit status 1).

trio reports a failing task inside an exception group; ``leaves`` flattens
one to the exceptions that actually happened, for the message.
"""

from __future__ import annotations


class CommandError(Exception):
    """The command failed at run time; the message is what the user reads."""

    exit_status = 1


class UsageError(CommandError):
    """The command line asked for something impossible."""

    exit_status = 2


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups flattened, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def describe(exc: BaseException) -> str:
    """An exception in one line: its type and message (the type alone when
    it has no message)."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
