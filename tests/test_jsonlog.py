"""Unit tests of taskservice.observe.jsonlog, and a guard on the one private logging
attribute it sets."""

from __future__ import annotations

import io
import json
import logging

from taskservice.observe import jsonlog


def test_configure_stops_logging_from_walking_the_stack() -> None:
    """jsonlog.configure sets logging._srcfile = None so that no record looks
    for its caller. If a Python release drops or renames that switch, this
    fails loudly (and the lines would only cost more, not change)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile)  # type: ignore[attr-defined]
    try:
        jsonlog.configure("INFO")
        assert hasattr(logging, "_srcfile") and logging._srcfile is None  # type: ignore[attr-defined]
        seen: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record)

        logging.getLogger("jsonlog-test").addHandler(Keep())
        logging.getLogger("jsonlog-test").warning("hello")
        assert (
            seen
            and seen[0].pathname == "(unknown file)"
            and seen[0].funcName == "(unknown function)"
        )
    finally:
        root.handlers[:], level, logging._srcfile = saved[0], saved[1], saved[2]  # type: ignore[attr-defined]
        root.setLevel(level)


def test_a_line_is_one_json_object_in_cloud_loggings_shape() -> None:
    line = jsonlog.json_line(logging.WARNING, 'say "hi"\nthere', 1_700_000_000.25, "x", {"k": 1})
    entry = json.loads(line)
    assert entry == {
        "severity": "WARNING",
        "message": 'say "hi"\nthere',
        "time": "2023-11-14T22:13:20.250000Z",
        "logger": "x",
        "k": 1,
    }
    assert "\n" not in line
    handler = jsonlog.JsonLinesHandler(io.StringIO())
    assert isinstance(handler, logging.Handler)


def test_fields_orjson_refuses_still_make_one_json_line() -> None:
    """An int beyond 64 bits, a lone surrogate, a key that is not a string, an
    object JSON has no type for: each still gives one line of valid JSON."""
    big = 1 << 70

    class Thing:
        def __str__(self) -> str:
            return "a thing"

    cases: list[tuple[dict[str, object], dict[str, object]]] = [
        ({"n": big}, {"n": big}),
        ({"s": "bad \ud800 text"}, {"s": "bad \ud800 text"}),
        ({"d": {1: "one"}}, {"d": {"1": "one"}}),
        ({"o": Thing(), "é": "ü"}, {"o": "a thing", "é": "ü"}),
    ]
    for fields, expected in cases:
        line = jsonlog.json_line(logging.INFO, "m", 1_700_000_000.0, "x", fields)
        assert "\n" not in line
        entry = json.loads(line)
        assert {k: entry[k] for k in expected} == expected


async def test_held_lines_keep_their_trace_and_order() -> None:
    """log_fields holds a line to render later, on the event loop: it still
    carries the trace of the call that logged it, and a warning logged after
    it is written after it."""
    from taskservice.observe.tracing import CallTrace, current_trace

    stream = io.StringIO()
    handler = jsonlog.JsonLinesHandler(stream)
    handler.setFormatter(jsonlog.JsonFormatter())
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, jsonlog._handler)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    jsonlog._handler = handler
    logger = logging.getLogger("jsonlog-held")
    try:
        token = current_trace.set(
            CallTrace("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
        )
        jsonlog.log_fields(logger, logging.INFO, "first", {"n": 1})
        current_trace.reset(token)
        assert stream.getvalue() == ""  # held
        logger.warning("second")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["message"] for line in lines] == ["first", "second"]
        assert lines[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert lines[0]["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
        assert lines[0]["n"] == 1
        assert "trace_id" not in lines[1]
    finally:
        root.handlers[:], level, jsonlog._handler = saved
        root.setLevel(level)


async def test_a_line_that_cannot_be_encoded_or_rendered_does_not_block_the_rest() -> None:
    """A lone surrogate (from a path decoded with surrogateescape, say) and
    fields that no encoder takes: each line is still written, the lines
    after them too, and the handler keeps working."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    handler = jsonlog.JsonLinesHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(jsonlog.JsonFormatter())
    logger = logging.getLogger("jsonlog-bad-lines")
    logger.addHandler(handler)
    logger.propagate = False

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    try:
        handler.hold((logging.INFO, "surrogate \udcff here", 1.0, "x", None, None))
        handler.hold((logging.INFO, "bad fields", 1.0, "x", {"k": Unprintable()}, None))
        handler.hold((logging.INFO, "after", 1.0, "x", {"n": 1}, None))
        handler.flush()
        logger.warning("still working")
        stream.flush()
        text = stream.buffer.getvalue().decode()  # type: ignore[attr-defined]
        entries = [json.loads(line) for line in text.splitlines()]
        assert [e["message"] for e in entries] == [
            "surrogate \udcff here",
            "bad fields",
            "after",
            "still working",
        ]
        assert "unrenderable_fields" in entries[1]
        assert entries[2]["n"] == 1
    finally:
        logger.removeHandler(handler)
