"""Unit tests of taskservice.observe.tracing: the caller's trace from call metadata."""

from __future__ import annotations

import pytest

from taskservice.observe.tracing import CallTrace, parse_trace

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (
            (("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01"),),
            CallTrace(TRACE, "00f067aa0ba902b7", True),
        ),
        (
            (("traceparent", f"00-{TRACE}-00f067aa0ba902b7-00"),),
            CallTrace(TRACE, "00f067aa0ba902b7", False),
        ),
        (
            (("x-cloud-trace-context", f"{TRACE.upper()}/123;o=1"),),
            CallTrace(TRACE, format(123, "016x"), True),
        ),
        ((("x-cloud-trace-context", TRACE),), CallTrace(TRACE, None, False)),
        # traceparent wins over x-cloud-trace-context
        (
            (
                ("x-cloud-trace-context", f"{'a' * 32}/1"),
                ("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01"),
            ),
            CallTrace(TRACE, "00f067aa0ba902b7", True),
        ),
        # span id beyond uint64: the trace is kept, the span dropped
        (
            (("x-cloud-trace-context", f"{TRACE}/99999999999999999999"),),
            CallTrace(TRACE, None, False),
        ),
    ],
)
def test_reads_the_callers_trace(
    metadata: tuple[tuple[str, str], ...], expected: CallTrace
) -> None:
    assert parse_trace(metadata) == expected


@pytest.mark.parametrize(
    "value",
    [
        ("x-cloud-trace-context", f"{TRACE}/" + "9" * 4301),  # int() would refuse this
        ("x-cloud-trace-context", "0" * 32 + "/1"),
        ("x-cloud-trace-context", "nope"),
        ("traceparent", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"),
        ("traceparent", f"00-{TRACE}-" + "0" * 16 + "-01"),
        ("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01-extra"),
        ("traceparent", "x" * 10_000),
        ("traceparent", b"\xff\xfe"),
    ],
)
def test_a_malformed_header_is_ignored(value: tuple[str, object]) -> None:
    assert parse_trace((value,)) is None


def test_no_metadata_no_trace() -> None:
    assert parse_trace(None) is None and parse_trace(()) is None
