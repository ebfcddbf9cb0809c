"""Structured logs: one JSON object per line, in Cloud Logging's format.

Fields: severity, message, time (RFC 3339, UTC), logger, and for errors the
stack trace inside `message` (so Error Reporting picks it up). The level comes
from LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": message,
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "logger": record.name,
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str | None = None) -> None:
    """Sends the root logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    name = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    root.setLevel(
        getattr(logging, name, logging.INFO) if name in logging._nameToLevel else logging.INFO
    )
