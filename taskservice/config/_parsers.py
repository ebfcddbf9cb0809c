"""The parsers of settings: each checks one kind of value, with its bounds,
and says in one line what is wrong (ConfigError). The first line of each
parser's docstring is what docs/configuration.md says it accepts."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from taskservice.config._cgroup import available_cpus

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ACCESS_LOGS = ("on", "all", "off")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which of the supervisor's workers this process is, and the file in
    which every worker marks itself ready (one byte each)."""

    index: int
    count: int
    readiness_path: str


def integer(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={value} is outside {lo}..{hi}")
        return value

    parse.__doc__ = f"an integer, {lo}..{hi}"
    return parse


def seconds(lo: int, hi: int) -> Callable[[str, str], float]:
    """Whole seconds, lo..hi, kept as a float."""
    whole = integer(lo, hi)

    def parse(name: str, raw: str) -> float:
        return float(whole(name, raw))

    parse.__doc__ = f"whole seconds, {lo}..{hi}"
    return parse


def number(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={value:g} is outside {lo:g}..{hi:g}")
        return value

    parse.__doc__ = f"a number, {lo:g}..{hi:g}"
    return parse


def choice(*options: str) -> Callable[[str, str], str]:
    """One of `options`, in any case."""

    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        if value not in options:
            shown = " or ".join(repr(c) for c in options)
            raise ConfigError(f"{name}={value!r} must be {shown}")
        return value

    parse.__doc__ = " or ".join(options)
    return parse


def switch(name: str, raw: str) -> bool:
    """on or off"""
    return choice("on", "off")(name, raw) == "on"


def text(name: str, raw: str) -> str:
    """text"""
    return raw


def matching(pattern: str, must: str) -> Callable[[str, str], str]:
    """Text that fully matches `pattern`; else '<NAME>=<value> <must>'."""
    compiled = re.compile(pattern)

    def parse(name: str, raw: str) -> str:
        if not compiled.fullmatch(raw):
            raise ConfigError(f"{name}={raw!r} {must}")
        return raw

    parse.__doc__ = must.removeprefix("must be ").removeprefix("is not ")
    return parse


def log_level(name: str, raw: str) -> str:
    """one of DEBUG, INFO, WARNING, ERROR (any case)"""
    value = raw.upper()
    if value not in LOG_LEVELS:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(LOG_LEVELS)}")
    return value


def emails(name: str, raw: str) -> tuple[str, ...]:
    """comma-separated emails"""
    found = tuple(e.strip().lower() for e in raw.split(",") if e.strip())
    bad = [e for e in found if not re.fullmatch(r"[^@\s,]+@[^@\s,]+", e)]
    if bad:
        raise ConfigError(f"{name} has entries that are not emails: {bad}")
    return found


def certs_url(name: str, raw: str) -> str:
    """an https URL (http on loopback)"""
    if not raw.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        raise ConfigError(f"{name} must be https (or http on loopback)")
    return raw


def worker_count(name: str, raw: str) -> int:
    """1..64, or auto: the CPUs this container may use"""
    if raw.lower() == "auto":
        return available_cpus()
    return integer(1, 64)(name, raw)


def worker_slot(name: str, raw: str) -> WorkerSlot:
    """set by the supervisor"""
    index, _, rest = raw.partition("/")
    count, _, path = rest.partition(":")
    try:
        slot = WorkerSlot(int(index), int(count), path)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is set by taskservice itself") from None
    if not 0 <= slot.index < slot.count or not path:
        raise ConfigError(f"{name}={raw!r} is set by taskservice itself")
    return slot
