"""Structured logs: one JSON object per line, in Cloud Logging's format.

Fields: severity, message, time (RFC 3339, UTC), logger; the trace of the call
being served as `logging.googleapis.com/trace` (projects/P/traces/T),
`logging.googleapis.com/spanId` and `logging.googleapis.com/trace_sampled`;
any `extra={"fields": {...}}` of the record; and for errors the stack trace
inside `message`, where Error Reporting finds it. The level comes from
LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


@dataclass(frozen=True, slots=True)
class CallTrace:
    trace_id: str  # 32 hex digits
    span_id: str | None  # 16 hex digits
    sampled: bool


current_trace: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar(
    "current_trace", default=None
)
_project = ""


def set_project(project: str) -> None:
    """The project that trace resource names are built with."""
    global _project
    _project = project


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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": message,
            "time": _rfc3339(record.created),
            "logger": record.name,
        }
        trace = current_trace.get()
        if trace is not None:
            if _project:
                entry["logging.googleapis.com/trace"] = (
                    f"projects/{_project}/traces/{trace.trace_id}"
                )
            else:
                entry["trace_id"] = trace.trace_id
            if trace.span_id:
                entry["logging.googleapis.com/spanId"] = trace.span_id
            entry["logging.googleapis.com/trace_sampled"] = trace.sampled
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str | None = None) -> None:
    """Sends the root logger's records to stderr as JSON lines."""
    # Fields the JSON lines never show: skip computing them for every record
    # (finding the caller walks the stack on each call).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    name = (level or os.environ.get("LOG_LEVEL") or "INFO").strip().upper()
    root.setLevel(logging.getLevelNamesMapping().get(name, logging.INFO))
