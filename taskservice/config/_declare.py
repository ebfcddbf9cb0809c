"""How a setting is declared: `setting` makes a Config field that carries its
environment variable, parser, default and meaning; `Setting` is the same,
read back from the field for load, --help and the docs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
Parse = Callable[[str, str], object]  # (variable, raw value) -> value; raises ConfigError


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as declared on Config: see `setting`."""

    env: str
    attribute: str
    default: object
    parse: Parse
    meaning: str
    shown_default: str  # as --help and the docs show the default
    flag: str | None = None
    platform: bool = False  # set by a platform: empty means unset


def setting(
    env: str,
    default: T,
    parse: Callable[[str, str], T],
    meaning: str,
    *,
    shown: str | None = None,
    flag: str | None = None,
    platform: bool = False,
) -> T:
    """Declares a Config field read from `env`: the field's default, the
    parser that checks a set value, and what it means (shown: how the
    default reads in --help, where it is not the value itself)."""
    if shown is None:
        shown = "unset" if default in ("", None, ()) else _shown(default)
    declared = {"env": env, "parse": parse, "meaning": meaning, "shown": shown}
    return field(default=default, metadata={**declared, "flag": flag, "platform": platform})


def _shown(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
