"""Structured logs: one JSON object per line, in Cloud Logging's format.

Fields: severity, message, time (RFC 3339, UTC), logger; the trace of the call
being served as `logging.googleapis.com/trace` (projects/P/traces/T),
`logging.googleapis.com/spanId` and `logging.googleapis.com/trace_sampled`;
any `extra={"fields": {...}}` of the record; and for errors the stack trace
inside `message`, where Error Reporting finds it. The level comes from
configuration (LOG_LEVEL, checked there) and governs diagnostics; the access
lines (logger ACCESS_LOGGER) have a switch of their own
(TASKSERVICE_ACCESS_LOG), since monitoring is built on them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import select
import sys
import time
from typing import TypeAlias

import orjson

from taskservice.observe.tracing import CallTrace, current_trace

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


_project = ""


def set_project(project: str) -> None:
    """The project that trace resource names are built with."""
    global _project
    _project = project


# What orjson cannot encode (an int beyond 64 bits, a lone surrogate, a key
# that is not a string) is encoded by the standard library's encoder instead.
_encode_any = json.JSONEncoder(ensure_ascii=False, default=str).encode


def _encode(entry: dict[str, object]) -> str:
    """One JSON object, compact, non-ASCII as is. orjson takes about a
    twentieth of the standard encoder's time, and every call's access line
    goes through here."""
    try:
        return orjson.dumps(entry, default=str).decode()
    except orjson.JSONEncodeError:
        return _encode_any(entry)


_second = -1
_second_text = ""


def _rfc3339(created: float) -> str:
    """UTC time with microseconds; the seconds part is formatted once per second."""
    global _second, _second_text
    whole = int(created)
    if whole != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = whole
    return f"{_second_text}.{int((created - whole) * 1e6):06d}Z"


def json_line(
    levelno: int, message: str, created: float, logger: str, fields: dict[str, object] | None
) -> str:
    """One log entry as a JSON object, with the trace of the call being served."""
    return render(levelno, message, created, logger, fields, current_trace.get())


def render(
    levelno: int,
    message: str,
    created: float,
    logger: str,
    fields: dict[str, object] | None,
    trace: CallTrace | None,
) -> str:
    """One log entry as a JSON object, with the given call's trace."""
    entry: dict[str, object] = {
        "severity": _SEVERITY.get(levelno, "DEFAULT"),
        "message": message,
        "time": _rfc3339(created),
        "logger": logger,
    }
    if trace is not None:
        if _project:
            entry["logging.googleapis.com/trace"] = f"projects/{_project}/traces/{trace.trace_id}"
        else:
            entry["trace_id"] = trace.trace_id
        if trace.span_id:
            entry["logging.googleapis.com/spanId"] = trace.span_id
        entry["logging.googleapis.com/trace_sampled"] = trace.sampled
    if fields:
        entry.update(fields)
    return _encode(entry)


def _render_held(entry: Entry) -> str:
    """A held line; fields no encoder takes are replaced by their repr."""
    try:
        return render(*entry)
    except Exception:
        levelno, message, created, logger, fields, trace = entry
        try:
            shown = repr(fields)
        except Exception:
            shown = "?"
        return render(levelno, message, created, logger, {"unrenderable_fields": shown}, trace)


# A line not yet rendered: render()'s arguments, taken when it was logged.
Entry: TypeAlias = tuple[int, str, float, str, "dict[str, object] | None", "CallTrace | None"]
# What a held entry counts for toward _MAX_PENDING (an access line's size).
_ENTRY_BYTES = 320


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        extra = getattr(record, "fields", None)
        return json_line(
            record.levelno,
            message,
            record.created,
            record.name,
            extra if isinstance(extra, dict) else None,
        )


FLUSH_SECONDS = 0.05
# A write of at most this many bytes to a pipe is atomic (POSIX PIPE_BUF):
# the workers of TASKSERVICE_WORKERS share one stderr, and a longer write can
# be interleaved with another worker's, cutting lines in two.
ATOMIC_WRITE = select.PIPE_BUF
_MAX_PENDING = 1 << 16


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes JSON lines to a stream in whole-line writes of at most
    ATOMIC_WRITE bytes each (a longer line alone). Records below WARNING that
    are written on an event loop (the access lines of a busy server) are held
    and written together FLUSH_SECONDS later, a few writes for many calls
    instead of one per call; anything else, and everything written off the
    loop, goes out at once, behind what was held. logging.shutdown() (at
    exit) flushes what is left. Entries held by log_fields are rendered when
    they are written: many at a time, off the call's own path."""

    def __init__(self, stream: io.TextIOBase) -> None:
        super().__init__(stream)
        # The loop a flush is scheduled on (a loop that closed before its
        # flush ran leaves a stale one: the next line schedules again).
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._held: list[str | Entry] = []
        self._held_size = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record), record.levelno)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_line(self, line: str, levelno: int) -> None:
        self._hold(line, len(line), levelno)

    def hold(self, entry: Entry) -> None:
        """Holds a line to render when it is written (entry[0] is its level).
        A failure to write never reaches the caller (as for any record)."""
        try:
            self._hold(entry, _ENTRY_BYTES, entry[0])
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": entry[1], "levelno": entry[0]}))

    def _hold(self, item: str | Entry, size: int, levelno: int) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._held.append(item)
            self._held_size += size + 1
            if levelno >= logging.WARNING or self._held_size >= _MAX_PENDING:
                self._write_held()
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # written off any event loop: at once
                self._write_held()
                return
            if self._flush_loop is not loop:  # none pending on this loop
                self._flush_loop = loop
                loop.call_later(FLUSH_SECONDS, self._flush_later)

    def _write_held(self) -> None:
        """The held lines, in writes of whole lines of at most ATOMIC_WRITE
        bytes. They leave the list first: a line that cannot be rendered or
        written is lost alone, and never blocks the ones after it."""
        held, self._held, self._held_size = self._held, [], 0
        chunk: list[str] = []
        size = 0
        for item in held:
            line = (item if isinstance(item, str) else _render_held(item)) + "\n"
            # Counted as the stream encodes it (errors="backslashreplace").
            length = len(line) if line.isascii() else len(line.encode("utf-8", "backslashreplace"))
            if chunk and size + length > ATOMIC_WRITE:
                self.stream.write("".join(chunk))
                self.stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += length
        if chunk:
            self.stream.write("".join(chunk))
            self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_held()

    def _flush_later(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_loop = None
            self._write_held()


ACCESS_LOGGER = "taskservice.access"
# TASKSERVICE_ACCESS_LOG: the level the access logger passes, whatever the
# root's (calls are INFO, or ERROR for INTERNAL; health and reflection DEBUG).
_ACCESS_LEVELS = {"on": logging.INFO, "all": logging.DEBUG, "off": logging.CRITICAL + 1}


def configure(level: str = "INFO", access: str = "on") -> None:
    """Sends the root logger's records to stderr as JSON lines, from `level`
    (a name config.LOG_LEVELS allows) up; access lines as `access` says (a
    name config.ACCESS_LOGS allows), whatever `level`."""
    # Fields the JSON lines never show: skip computing them for every record.
    # Finding the caller walks the stack on each call, and the only switch is
    # the module attribute that logging's own source documents for this
    # ("Setting _srcfile to None will prevent findCaller() from being
    # called"); tests/test_jsonlog.py fails loudly if it stops working.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = open(  # noqa: SIM115 - lives as long as the process
        sys.stderr.fileno(),
        "w",
        buffering=1 << 16,
        encoding="utf-8",
        errors="backslashreplace",
        closefd=False,
    )
    handler = JsonLinesHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    global _handler
    _handler = handler
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
    logging.getLogger(ACCESS_LOGGER).setLevel(_ACCESS_LEVELS[access])


_handler: JsonLinesHandler | None = None  # the handler configure() installed


def log_fields(
    logger: logging.Logger, levelno: int, message: str, fields: dict[str, object]
) -> None:
    """logger.log(levelno, message, extra={"fields": fields}), taking a short
    cut on the hot path: when the process logs through configure()'s handler
    alone, the line is held without a LogRecord or the handler chain (one
    access line per RPC costs a busy server ~100 µs per call that way), and
    rendered with the others when they are written. fields must not change
    after the call. Any other logging setup (tests adding handlers, say) gets the
    record through the normal path."""
    if not logger.isEnabledFor(levelno):
        return
    handler = _handler
    if handler is not None and _only_handler(logger, handler) and levelno >= handler.level:
        handler.hold((levelno, message, time.time(), logger.name, fields, current_trace.get()))
    else:
        logger.log(levelno, "%s", message, extra={"fields": fields})


def _only_handler(logger: logging.Logger, handler: logging.Handler) -> bool:
    """True when handler, unfiltered, is the only one a record of logger reaches."""
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters:
            return False
        if node.parent is None:
            return node.handlers == [handler] and not handler.filters
        if node.handlers or not node.propagate:
            return False
        node = node.parent
    return False
