"""What the service tells its operators: JSON log lines (jsonlog), the
caller's trace context (tracing), and OpenTelemetry metrics and spans
(telemetry). Used by the api and the stores, so it imports neither.

telemetry is imported by path, and only when TASKSERVICE_TELEMETRY is on:
it loads the OpenTelemetry SDK, which a server without telemetry never pays
for."""

from taskservice.observe import jsonlog, tracing
from taskservice.observe.jsonlog import log_fields
from taskservice.observe.tracing import CallTrace, current_trace, parse_trace

__all__ = ["CallTrace", "current_trace", "jsonlog", "log_fields", "parse_trace", "tracing"]
