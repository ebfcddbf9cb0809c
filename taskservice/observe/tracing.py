"""The caller's trace: read from the call's metadata, bound to the call's context.

`traceparent` (W3C) is preferred; Cloud Run's `x-cloud-trace-context`
(TRACE_ID/SPAN_ID;o=OPTIONS) is the fallback. A malformed header is ignored
and the call proceeds untraced: parse_trace never raises, whatever the caller
sent. While a call runs, current_trace holds its trace, which every log line
written meanwhile carries.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# The span id is a decimal uint64: at most 20 digits (a longer run of digits
# is refused by the pattern, before int() could be asked to read it).
_CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/(\d{1,20}))?(?:;o=([01]))?")
_MAX_HEADER = 256
_ZERO_TRACE = "0" * 32


@dataclass(frozen=True, slots=True)
class CallTrace:
    trace_id: str  # 32 lower-case hex digits
    span_id: str | None  # 16 lower-case hex digits
    sampled: bool


current_trace: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar(
    "current_trace", default=None
)


def parse_trace(metadata: Iterable[tuple[str, str | bytes]] | None) -> CallTrace | None:
    """The caller's trace, or None (no header, or none that is well formed)."""
    traceparent = cloud = None
    for key, value in metadata or ():
        if key == "traceparent":
            traceparent = value
        elif key == "x-cloud-trace-context":
            cloud = value
    if isinstance(traceparent, str) and len(traceparent) <= _MAX_HEADER:
        m = _TRACEPARENT.fullmatch(traceparent.strip())
        if m and m.group(1) != _ZERO_TRACE and m.group(2) != "0" * 16:
            return CallTrace(m.group(1), m.group(2), m.group(3) == "01")
    if isinstance(cloud, str) and len(cloud) <= _MAX_HEADER:
        m = _CLOUD_TRACE.fullmatch(cloud.strip())
        if m and m.group(1) != _ZERO_TRACE:
            span = int(m.group(2)) if m.group(2) else 0
            span_id = format(span, "016x") if 0 < span < 2**64 else None
            return CallTrace(m.group(1).lower(), span_id, m.group(3) == "1")
    return None
