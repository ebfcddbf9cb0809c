"""OpenTelemetry metrics and traces: every call, and the store's own calls.

Off unless TASKSERVICE_TELEMETRY is `otlp` (to an OpenTelemetry collector at
OTEL_EXPORTER_OTLP_ENDPOINT) or `gcp` (the same OTLP exporters, to Google's
Telemetry API, telemetry.googleapis.com: traces to Cloud Trace, metrics to
Cloud Monitoring as Managed Service for Prometheus metrics; over TLS with the
Application Default Credentials' token on each export, and the Google Cloud
resource detector). That is the path Google maintains: its own exporters
(opentelemetry-exporter-gcp-trace and -monitoring) are deprecated in favour of
it. With telemetry off nothing here is imported.

Why opentelemetry-sdk and not gRPC's own plugin (grpcio-observability): on
grpc.aio servers the plugin records every method as "other" and does no
tracing (grpc/grpc#39061, #41573), and its per-call lock can stall the event
loop while an export holds it (#43098). The call pipeline (taskservice.api.calls)
already knows each call's method, status, latency and message counts, so it
records them here under gRPC's standard instrument names (gRFC A66):

  grpc.server.call.started                 counter    grpc.method
  grpc.server.call.duration                histogram  grpc.method, grpc.status (s),
                                                      taskservice.fault (not OK: server|caller)
  taskservice.server.calls.in_flight       up-down counter, grpc.method
  taskservice.server.stream.messages       histogram  grpc.method, direction
      (messages per streaming call: batch sizes, watch events)
  grpc.client.attempt.duration             histogram  grpc.method, grpc.target, grpc.status
      (each Firestore RPC, e.g. google.firestore.v1.Firestore/Commit)
  taskservice.sqlite.commit.duration       histogram  outcome (s)
  taskservice.sqlite.commit.writes         histogram  outcome (writes per group commit)

Per unary call that is one histogram record (starts and calls in flight are
plain counters, read at export time) and, for a sampled call, its span: an
unsampled call makes no span. (A66's message-size histograms are left out:
two more records per call, for figures the access lines already hold.)

A method the server does not have is `other` (A66). `taskservice.fault`
says whose doing a status that is not OK is (taskservice.api.calls): the
error-ratio alert counts `server` only.

Spans follow OpenTelemetry's RPC conventions (release candidate):
`rpc.system.name` grpc, `rpc.method` the full method name (`_OTHER`, with
`rpc.method_original`, for a method the server does not have),
`rpc.response.status_code` the status code's name; a SERVER span is ERROR
only for the server-side codes (errors.SERVER_CODES), with `error.type` the
code; a CLIENT span (a Firestore RPC) for any code but OK.

Traces: one SERVER span per sampled call, a child of the caller's span when the call
carries `traceparent` or Cloud Run's `x-cloud-trace-context` (sampled as the
caller decided; calls without one at TASKSERVICE_TRACE_SAMPLE_RATIO), with a
CLIENT child span per Firestore RPC (not the one long Listen stream of
WatchTasks) and an INTERNAL child span per SQLite group commit that carried
the call's write. While a sampled call runs, its log lines carry its span.

The exporters and what guards them: taskservice.observe._export.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from contextvars import Token
from typing import TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from taskservice import __version__
from taskservice.domain.errors import SERVER_CODES
from taskservice.observe._export import (
    EXPORT_TIMEOUT_SECONDS,
    LATENCY_BUCKETS,
    SHUTDOWN_SECONDS,
    SPAN_BATCH,
    SPAN_QUEUE,
    GuardedMetricExporter,
    GuardedSpanExporter,
    LatencyHistograms,
    OncePerMinute,
    TelemetrySettings,
    build_exporters,
    quiet_sdk_logs,
)
from taskservice.observe.tracing import CallTrace

__all__ = [
    "SERVER_ERROR_CODES",
    "CallSpan",
    "OncePerMinute",
    "Telemetry",
    "TelemetrySettings",
    "build_exporters",
    "start_telemetry",
]

FIRESTORE_SERVICE = "google.firestore.v1.Firestore"
COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000, 100000)
# The server-side codes the error-ratio alert counts, when the server caused
# them (taskservice.fault="server"; not the caller's own mistakes, such as
# NOT_FOUND or INVALID_ARGUMENT, nor its slowness).
SERVER_ERROR_CODES = ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN")


_R = TypeVar("_R")  # a Firestore RPC's response


class CallSpan:
    """One call's span and in-flight count, from start_call to end_call."""

    __slots__ = ("attributes", "log_trace", "method", "span", "token")

    def __init__(
        self,
        span: trace.Span | None,
        token: Token[otel_context.Context] | None,
        attributes: dict[str, str],
        log_trace: CallTrace | None,
    ) -> None:
        self.method = "/" + attributes["grpc.method"]
        self.span = span
        self.token = token
        self.attributes = attributes
        self.log_trace = log_trace


class Telemetry:
    """The providers, instruments and the hooks the pipeline and stores call."""

    def __init__(
        self,
        settings: TelemetrySettings,
        span_exporter: SpanExporter,
        metric_exporter: MetricExporter,
        resource: Resource | None = None,
    ) -> None:
        quiet_sdk_logs()
        where = settings.otlp_endpoint if settings.exporter == "otlp" else settings.exporter
        self.settings = settings
        self.span_exporter = GuardedSpanExporter(span_exporter, where)
        self._duration = LatencyHistograms(
            "grpc.server.call.duration", "Call latency, to the status"
        )
        self._firestore = LatencyHistograms(
            "grpc.client.attempt.duration", "Firestore RPCs by method and status"
        )
        self.metric_exporter = GuardedMetricExporter(
            metric_exporter, where, (self._duration, self._firestore)
        )
        resource = resource or Resource.create({"service.name": settings.service})
        self.tracer_provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(ALWAYS_ON),  # start_call samples roots itself
            shutdown_on_exit=False,
        )
        self.tracer_provider.add_span_processor(
            BatchSpanProcessor(
                self.span_exporter,
                max_queue_size=SPAN_QUEUE,
                max_export_batch_size=SPAN_BATCH,
                schedule_delay_millis=min(5000, int(settings.metrics_interval_seconds * 1000)),
                export_timeout_millis=int(EXPORT_TIMEOUT_SECONDS * 1000),
            )
        )
        self.reader = PeriodicExportingMetricReader(
            self.metric_exporter,
            export_interval_millis=settings.metrics_interval_seconds * 1000,
            export_timeout_millis=EXPORT_TIMEOUT_SECONDS * 1000,
        )
        latency = ExplicitBucketHistogramAggregation(LATENCY_BUCKETS)
        counts = ExplicitBucketHistogramAggregation(COUNT_BUCKETS)
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=[self.reader],
            shutdown_on_exit=False,
            views=[
                View(instrument_name="*.duration", aggregation=latency),
                View(instrument_name="taskservice.server.stream.messages", aggregation=counts),
                View(instrument_name="taskservice.sqlite.commit.writes", aggregation=counts),
            ],
        )
        self.tracer = self.tracer_provider.get_tracer("taskservice", __version__)
        meter = self.meter_provider.get_meter("taskservice", __version__)
        # Per call, one histogram record: starts and calls in flight are plain
        # counters here, read by the SDK at export time (observable instruments).
        self._started: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        meter.create_observable_counter(
            "grpc.server.call.started",
            callbacks=[lambda _options: self._observe(self._started)],
            unit="{call}",
            description="Calls started",
        )
        meter.create_observable_up_down_counter(
            "taskservice.server.calls.in_flight",
            callbacks=[lambda _options: self._observe(self._in_flight)],
            unit="{call}",
            description="Calls in progress",
        )
        self._messages = meter.create_histogram(
            "taskservice.server.stream.messages",
            unit="{message}",
            description="Messages per streaming call (batch sizes, watch events)",
        )
        self._commit_seconds = meter.create_histogram(
            "taskservice.sqlite.commit.duration", unit="s", description="SQLite group commits"
        )
        self._commit_writes = meter.create_histogram(
            "taskservice.sqlite.commit.writes",
            unit="{write}",
            description="Writes per SQLite group commit",
        )
        self._method_attributes: dict[str, dict[str, str]] = {}
        self._coded: dict[tuple[str, str, str], dict[str, str]] = {}
        # The Firestore channel's target (A66's grpc.target), set by the store.
        self.firestore_target = ""
        self.sample_ratio = settings.sample_ratio

    def _observe(self, counts: dict[str, int]) -> list[Observation]:
        # list() of a dict's items is one C call: atomic against the loop thread.
        return [
            Observation(n, self._method_attributes[method]) for method, n in list(counts.items())
        ]

    def _attributes(self, method: str, code: str | None = None, extra: str = "") -> dict[str, str]:
        """The attribute dicts, made once per method (and code, and fault or
        target)."""
        if code is None:
            attributes = self._method_attributes.get(method)
            if attributes is None:
                attributes = {"grpc.method": method.lstrip("/")}
                self._method_attributes[method] = attributes
            return attributes
        coded = self._coded.get((method, code, extra))
        if coded is None:
            coded = {"grpc.method": method.lstrip("/"), "grpc.status": code}
            if extra:
                firestore = method.startswith(f"/{FIRESTORE_SERVICE}/")
                coded["grpc.target" if firestore else "taskservice.fault"] = extra
            self._coded[(method, code, extra)] = coded
        return coded

    # -- server calls ----------------------------------------------------------

    def start_call(
        self, method: str, caller: CallTrace | None, *, traced: bool = True, original: str = ""
    ) -> CallSpan:
        """Counts the call and, when it is sampled, starts its span (current
        until end_call). original: the path an unknown method (`other`) was
        called with. A caller's trace header decides; a call without one
        is sampled at sample_ratio; traced=False (health checks, reflection):
        only metrics. An unsampled call makes no span at all."""
        attributes = self._attributes(method)
        self._started[method] = self._started.get(method, 0) + 1
        self._in_flight[method] = self._in_flight.get(method, 0) + 1
        if not traced:
            return CallSpan(None, None, attributes, caller)
        if caller is None:
            if not (self.sample_ratio and random.random() < self.sample_ratio):
                return CallSpan(None, None, attributes, None)
            parent = otel_context.Context()
        elif not caller.sampled:
            return CallSpan(None, None, attributes, caller)
        else:
            span_id = int(caller.span_id, 16) if caller.span_id else int.from_bytes(os.urandom(8))
            remote = SpanContext(
                trace_id=int(caller.trace_id, 16),
                span_id=span_id or 1,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        on_span = {"rpc.system.name": "grpc", "rpc.method": method.lstrip("/")}
        if original:  # a method the server does not have
            on_span = {**on_span, "rpc.method": "_OTHER", "rpc.method_original": original}
        span = self.tracer.start_span(
            method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=on_span
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        own = span.get_span_context()
        log_trace = CallTrace(format(own.trace_id, "032x"), format(own.span_id, "016x"), True)
        return CallSpan(span, token, attributes, log_trace)

    def end_call(
        self,
        call: CallSpan,
        code: str,
        seconds: float,
        messages_in: int | None,
        messages_out: int | None,
        fault: str = "",
    ) -> None:
        """fault: whose doing a status that is not OK is (server or caller)."""
        if call.token is not None:
            otel_context.detach(call.token)
        method = call.method
        self._in_flight[method] -= 1
        fault = "" if code == "OK" else fault  # no attribute on OK points
        self._duration.record((method, code, fault), self._attributes(method, code, fault), seconds)
        if messages_in is not None:
            self._messages.record(messages_in, {**call.attributes, "direction": "received"})
        if messages_out is not None:
            self._messages.record(messages_out, {**call.attributes, "direction": "sent"})
        span = call.span
        if span is not None and span.is_recording():
            span.set_attribute("rpc.response.status_code", code)
            if code in SERVER_CODES:  # OpenTelemetry's gRPC conventions
                span.set_attribute("error.type", code)
                span.set_status(Status(StatusCode.ERROR, code))
            span.end()

    # -- Firestore RPCs ----------------------------------------------------------

    async def firestore_unary(self, method: str, call: Awaitable[_R]) -> _R:
        """Awaits one unary Firestore RPC inside its span, recording its code."""
        span, started = self._firestore_start(method)
        code = "UNKNOWN"
        try:
            result = await call
            code = "OK"
            return result
        except BaseException as exc:
            code = _code_of(exc)
            raise
        finally:
            self._firestore_end(method, span, started, code)

    async def firestore_stream(self, method: str, call: AsyncIterable[_R]) -> AsyncIterator[_R]:
        """Yields one server-streaming Firestore RPC's responses inside its span."""
        span, started = self._firestore_start(method)
        code = "UNKNOWN"
        try:
            async for response in call:
                yield response
            code = "OK"
        except BaseException as exc:
            code = _code_of(exc)
            raise
        finally:
            self._firestore_end(method, span, started, code)

    def _firestore_start(self, method: str) -> tuple[trace.Span | None, float]:
        """A CLIENT span when a sampled call is being served (never a root)."""
        span = None
        if trace.get_current_span().is_recording():
            span = self.tracer.start_span(
                f"{FIRESTORE_SERVICE}/{method}",
                kind=SpanKind.CLIENT,
                attributes={
                    "rpc.system.name": "grpc",
                    "rpc.method": f"{FIRESTORE_SERVICE}/{method}",
                },
            )
        return span, time.perf_counter()

    def _firestore_end(
        self, method: str, span: trace.Span | None, started: float, code: str
    ) -> None:
        full = f"/{FIRESTORE_SERVICE}/{method}"
        target = self.firestore_target
        seconds = time.perf_counter() - started
        self._firestore.record((full, code, target), self._attributes(full, code, target), seconds)
        if span is not None:
            span.set_attribute("rpc.response.status_code", code)
            if code != "OK":  # a client span: any code but OK is an error
                span.set_attribute("error.type", code)
                span.set_status(Status(StatusCode.ERROR, code))
            span.end()

    # -- SQLite commits ----------------------------------------------------------

    def sqlite_group(self, writes: int, seconds: float, ok: bool) -> None:
        """One group commit (the writer thread calls this)."""
        outcome = {"outcome": "committed" if ok else "failed"}
        self._commit_seconds.record(seconds, outcome)
        self._commit_writes.record(writes, outcome)

    def sqlite_commit_span(self, started_ns: int, ended_ns: int, writes: int, ok: bool) -> None:
        """The group commit that carried the current call's write, as its child span."""
        current = trace.get_current_span()
        if not current.is_recording():
            return
        span = self.tracer.start_span(
            "sqlite.commit",
            kind=SpanKind.INTERNAL,
            start_time=started_ns,
            attributes={"db.system": "sqlite", "taskservice.commit.writes": writes},
        )
        if not ok:
            span.set_status(Status(StatusCode.ERROR, "the group commit failed"))
        span.end(end_time=ended_ns)

    # -- lifecycle -----------------------------------------------------------------

    def flush(self, timeout: float = EXPORT_TIMEOUT_SECONDS) -> None:
        """Exports what is pending now (tests; the drain)."""
        self.tracer_provider.force_flush(int(timeout * 1000))
        self.meter_provider.force_flush(int(timeout * 1000))

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """A last export, given at most `timeout` seconds (it runs on a
        daemon thread: an unreachable collector cannot hold up the exit)."""

        def close() -> None:
            with contextlib.suppress(Exception):
                self.meter_provider.shutdown(timeout_millis=timeout * 1000)
            with contextlib.suppress(Exception):
                self.tracer_provider.shutdown()

        closing = threading.Thread(target=close, name="telemetry-shutdown", daemon=True)
        closing.start()
        closing.join(timeout)


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, GeneratorExit):  # the store stopped reading: the RPC is cancelled
        return "CANCELLED"
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            value = code()
        except Exception:
            return "UNKNOWN"
        name = getattr(value, "name", None)
        if isinstance(name, str):
            return name
    if type(exc).__name__ == "CancelledError":
        return "CANCELLED"
    return "UNKNOWN"


def start_telemetry(settings: TelemetrySettings) -> Telemetry:
    spans, metrics, resource = build_exporters(settings)
    return Telemetry(settings, spans, metrics, resource)
