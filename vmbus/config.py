"""Device configuration: declared by each device, checked once, generically.

A device declares what it can be configured with as a dataclass, its
``DeviceSpec.config_schema``: field names are option names, annotations
their types (``str``, ``int``, ``float``, ``bool``, ``Size`` for byte
counts written ``4k``/``1M``/``2G``, or ``X | None`` for an option that
keeps the device's own default when not given); a field without a default
is required.  The bus turns what a user wrote (``--device
storage:path=disk.img,read_only=yes`` on the command line, the same pairs
from anywhere else) into a checked ``dict`` for the device's host half,
so a plug-in that needs configuration works without any edit to pvbus:

    @dataclass(frozen=True)
    class EntropyConfig:
        max_bytes: Size | None = option("largest answer (default 1k)")

Unknown options, missing required ones and values of the wrong type are a
``ConfigError`` that names the device, the option and what it takes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, NewType

Size = NewType("Size", int)  # a byte count; written 4096, 4k, 64KiB, 1M, 2G
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


class ConfigError(ValueError):
    """A device option that is unknown, missing or of the wrong type."""


def option(help: str, default: Any = None) -> Any:
    """A schema field with the words ``pvbus devices`` shows for it; the
    default ``None`` leaves the device's own default in place, and
    ``REQUIRED`` makes the option one the user must give."""
    if default is REQUIRED:
        return dataclasses.field(metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


REQUIRED: Any = object()


def parse_size(text: str) -> int:
    """``4k``, ``64KiB``, ``1M``, ``2G`` or plain bytes; ValueError, in
    words, for anything else or a size below one byte."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _UNITS.get(t[-1:], 1)
    try:
        size = int(float(t[:-1] if t[-1:] in _UNITS else t) * scale)
    except (ValueError, OverflowError):
        size = 0
    if size < 1:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with k, M, G or T (e.g. 128M)")
    return size


def parse_device_argument(text: str) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME:key=value,key=value`` -> (name, raw options)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"{text!r}: give a device name, then options as name:key=value,...")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"device {name}: {item!r} is not key=value")
        if key.strip() in options:
            raise ConfigError(f"device {name}: option {key.strip()} given twice")
        options[key.strip()] = value.strip()
    return name, options


def _option_type(annotation: Any) -> tuple[Any, bool]:
    """(the type a value converts to, whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported option type {annotation!r}")
        return args[0], True
    return annotation, False


def _convert(device: str, key: str, kind: Any, value: Any) -> Any:
    if not isinstance(value, str):  # from code, not typed by a user: check, do not convert
        base = typing.get_origin(kind) or kind
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, int) and not isinstance(value, bool) if kind in (int, Size) else
            isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
            isinstance(value, base)
        )
        if not ok:
            raise ConfigError(f"device {device}: option {key} takes {_describe(kind)}, not {value!r}")
        return value
    try:
        if kind is bool:
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ValueError(value)
        if kind is Size:
            return parse_size(value)
        if kind in (int, float, str):
            return kind(value)
    except ValueError:
        raise ConfigError(f"device {device}: option {key} takes {_describe(kind)}, not {value!r}") from None
    raise TypeError(f"device {device}: option {key} has an unsupported type {kind!r}")


def _describe(kind: Any) -> str:
    return {bool: "yes or no", int: "a whole number", float: "a number", str: "text",
            Size: "a size such as 4096, 64k or 1M"}.get(kind, repr(kind))


def build_config(device: str, schema: type | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Check and convert ``given`` against ``schema``; returns the options
    the device's host half gets (defaults filled in, ``None`` ones left out
    so the device applies its own).  A device that declares no schema gets
    what it was given, as it was, and checks it itself."""
    if schema is None:
        return dict(given)
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ConfigError(f"device {device} has no option {', '.join(unknown)}; "
                          f"its options: {', '.join(fields)}")
    converted: dict[str, Any] = {}
    for key, value in given.items():
        kind, _ = _option_type(hints[key])
        converted[key] = _convert(device, key, kind, value)
    missing = [name for name, f in fields.items() if name not in converted
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"device {device} needs option {', '.join(missing)}")
    built = dataclasses.asdict(schema(**converted))
    return {key: value for key, value in built.items() if value is not None}


def describe_options(schema: type | None) -> list[str]:
    """One line per option, for help text: ``name=<type>: help``."""
    if schema is None:
        return []
    hints = typing.get_type_hints(schema)
    lines = []
    for f in dataclasses.fields(schema):
        kind, _ = _option_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        words = f.metadata.get("help", "")
        if required:
            words = f"{words} (required)".strip()
        elif f.default is not None:
            words = f"{words} (default {f.default!r})".strip()
        lines.append(f"{f.name}=<{_describe(kind)}>: {words}")
    return lines
