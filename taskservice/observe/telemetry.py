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

Never slower or failing because of an exporter: spans go to a bounded queue
(2,048; dropped when full) that a background thread exports; metrics are
aggregated in memory and exported by another thread; exporters are wrapped so
that a failure never raises, and what the SDK and exporters log goes out at
most once a minute per logger, with a count of what was held back.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from taskservice import __version__
from taskservice.domain.errors import SERVER_CODES
from taskservice.observe.tracing import CallTrace

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.telemetry")

SPAN_QUEUE = 2048
SPAN_BATCH = 512
EXPORT_TIMEOUT_SECONDS = 5.0
SHUTDOWN_SECONDS = 1.0  # after the drain: a last export, then give up (Cloud Run allows 10 s)
LOG_EVERY_SECONDS = 60.0
FIRESTORE_SERVICE = "google.firestore.v1.Firestore"
# gRFC A66's latency buckets (seconds).
LATENCY_BUCKETS = (
    0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004,
    0.005, 0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08,
    0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1, 2, 5, 10, 20, 50, 100,
)  # fmt: skip
COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000, 100000)
# The server-side codes the error-ratio alert counts, when the server caused
# them (taskservice.fault="server"; not the caller's own mistakes, such as
# NOT_FOUND or INVALID_ARGUMENT, nor its slowness).
SERVER_ERROR_CODES = ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN")


@dataclass(frozen=True)
class TelemetrySettings:
    exporter: str  # "otlp" or "gcp"
    otlp_endpoint: str = "http://localhost:4317"
    sample_ratio: float = 0.01
    metrics_interval_seconds: float = 60.0
    service: str = "taskservice"
    revision: str = ""
    project: str = ""


# -- export that never fails a call -------------------------------------------


class OncePerMinute(logging.Filter):
    """Lets one record per logger through each LOG_EVERY_SECONDS; the next one
    that passes says how many were held back meanwhile."""

    def __init__(self, every: float = LOG_EVERY_SECONDS) -> None:
        super().__init__()
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(record.name)
            if last is not None and now - last < self.every:
                self._held[record.name] = self._held.get(record.name, 0) + 1
                return False
            self._last[record.name] = now
            held = self._held.pop(record.name, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} similar messages held back)"
            record.args = ()
        return True


class _QuietHandler(logging.Handler):
    """Where the OpenTelemetry SDK's and exporters' own log records go: through
    OncePerMinute, then to the root logger's handlers (our JSON lines)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.addFilter(OncePerMinute())

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


_quiet = _QuietHandler()


def quiet_sdk_logs() -> None:
    """Routes the `opentelemetry` loggers through one rate-limited handler."""
    otel = logging.getLogger("opentelemetry")
    if _quiet not in otel.handlers:
        otel.addHandler(_quiet)
    otel.propagate = False


class _Failures:
    """Counts an exporter's failures; logs at most once a minute."""

    def __init__(self, what: str, where: str) -> None:
        self.what = what
        self.where = where
        self.count = 0
        self._reported_at = -LOG_EVERY_SECONDS
        self._lock = threading.Lock()

    def failed(self, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.count += 1
            if now - self._reported_at < LOG_EVERY_SECONDS:
                return
            self._reported_at = now
            count = self.count
        log.warning(
            "telemetry: exporting %s to %s failed (%d failures so far): %s; calls are not affected",
            self.what,
            self.where,
            count,
            reason,
            extra={"fields": {"telemetry_failures": count}},
        )


class GuardedSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, where: str) -> None:
        self.inner = inner
        self.failures = _Failures("spans", where)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter bug must not reach the SDK's thread
            self.failures.failed(f"{type(exc).__name__}: {exc}")
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.failures.failed(f"{len(spans)} spans not accepted")
        return result

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception:
            return False


class LatencyHistograms:
    """Histograms of seconds by attribute set, kept here rather than in the SDK:
    one record is a bisect and three additions under a lock (about 1 µs; the
    SDK's Histogram.record took ~25 µs a call in the server under load). They
    are added, cumulative, to every export (GuardedMetricExporter)."""

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description
        self.started_ns = time.time_ns()
        self._series: dict[Any, list[Any]] = {}  # key -> [attributes, counts, sum, min, max]
        self._lock = threading.Lock()

    def record(self, key: Any, attributes: dict[str, str], seconds: float) -> None:
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = [attributes, [0] * (len(LATENCY_BUCKETS) + 1), 0.0, seconds, seconds]
                self._series[key] = series
            series[1][i] += 1
            series[2] += seconds
            if seconds < series[3]:
                series[3] = seconds
            if seconds > series[4]:
                series[4] = seconds

    def metric(self, now_ns: int) -> Metric | None:
        with self._lock:
            rows = [(a, list(c), total, lo, hi) for a, c, total, lo, hi in self._series.values()]
        if not rows:
            return None
        points = [
            HistogramDataPoint(
                attributes=attributes,
                start_time_unix_nano=self.started_ns,
                time_unix_nano=now_ns,
                count=sum(counts),
                sum=total,
                bucket_counts=counts,
                explicit_bounds=[float(b) for b in LATENCY_BUCKETS],
                min=lo,
                max=hi,
            )
            for attributes, counts, total, lo, hi in rows
        ]
        return Metric(
            name=self.name,
            description=self.description,
            unit="s",
            data=HistogramData(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


class GuardedMetricExporter(MetricExporter):
    def __init__(
        self, inner: MetricExporter, where: str, extra: Sequence[LatencyHistograms] = ()
    ) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.extra = extra
        self.failures = _Failures("metrics", where)

    def _with_extra(self, metrics_data: MetricsData) -> MetricsData:
        now = time.time_ns()
        added = [m for m in (h.metric(now) for h in self.extra) if m is not None]
        if not added or not metrics_data.resource_metrics:
            return metrics_data
        first, *rest = metrics_data.resource_metrics
        # Into the meter's own scope: exporters key scopes by name, and a second
        # "taskservice" scope would replace the first (the OTLP encoder's does).
        scopes = list(first.scope_metrics)
        ours = next((i for i, sm in enumerate(scopes) if sm.scope.name == "taskservice"), None)
        if ours is None:
            scope = InstrumentationScope("taskservice", __version__)
            scopes.append(ScopeMetrics(scope=scope, metrics=added, schema_url=""))
        else:
            own = scopes[ours]
            scopes[ours] = ScopeMetrics(
                scope=own.scope, metrics=[*own.metrics, *added], schema_url=own.schema_url
            )
        merged = ResourceMetrics(
            resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url
        )
        return MetricsData(resource_metrics=[merged, *rest])

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            metrics_data = self._with_extra(metrics_data)
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            self.failures.failed(f"{type(exc).__name__}: {exc}")
            return MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self.failures.failed("the metrics were not accepted")
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception:
            return False

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with contextlib.suppress(Exception):
            self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def build_exporters(settings: TelemetrySettings) -> tuple[SpanExporter, MetricExporter, Resource]:
    """The exporters and resource for settings.exporter (imported only here)."""
    resource = Resource.create(
        {
            "service.name": settings.service,
            "service.version": __version__,
            "service.instance.id": (
                f"{settings.revision or 'local'}-{os.getpid()}-{os.urandom(4).hex()}"
            ),
        }
    )
    if settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint
        insecure = endpoint.startswith("http://")
        spans = OTLPSpanExporter(
            endpoint=endpoint, insecure=insecure, timeout=int(EXPORT_TIMEOUT_SECONDS)
        )
        metrics = OTLPMetricExporter(
            endpoint=endpoint, insecure=insecure, timeout=int(EXPORT_TIMEOUT_SECONDS)
        )
        return spans, metrics, resource
    if settings.exporter == "gcp":
        return _google_exporters(settings, resource)
    raise ValueError(f"unknown telemetry exporter {settings.exporter!r}")


CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def _google_exporters(
    settings: TelemetrySettings, resource: Resource
) -> tuple[SpanExporter, MetricExporter, Resource]:
    """OTLP/gRPC to the Telemetry API (settings.otlp_endpoint, normally
    https://telemetry.googleapis.com), authenticated as the Application
    Default Credentials (on Cloud Run, the service's account): TLS, and the
    credentials' bearer token on every export, refreshed by google-auth.
    OTEL_EXPORTER_OTLP_CERTIFICATE names other root certificates (a stand-in)."""
    import google.auth
    import grpc
    from google.auth.transport.grpc import AuthMetadataPlugin
    from google.auth.transport.requests import Request
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.resourcedetector.gcp_resource_detector import (
        GoogleCloudResourceDetector,
    )

    if not settings.otlp_endpoint.startswith("https://"):
        raise ValueError(f"the Telemetry API needs TLS: {settings.otlp_endpoint!r} is not https")
    credentials, found = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    project = settings.project or found
    if not project:
        raise ValueError("TASKSERVICE_TELEMETRY=gcp needs a project: set GOOGLE_CLOUD_PROJECT")
    roots_file = os.environ.get("OTEL_EXPORTER_OTLP_CERTIFICATE", "").strip()
    roots = Path(roots_file).read_bytes() if roots_file else None
    channel = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(roots),
        grpc.metadata_call_credentials(AuthMetadataPlugin(credentials, Request())),  # type: ignore[no-untyped-call]
    )
    timeout = int(EXPORT_TIMEOUT_SECONDS)
    spans = OTLPSpanExporter(endpoint=settings.otlp_endpoint, credentials=channel, timeout=timeout)
    metrics = OTLPMetricExporter(
        endpoint=settings.otlp_endpoint, credentials=channel, timeout=timeout
    )
    # The Telemetry API files what it receives under gcp.project_id; Cloud
    # Monitoring keys each series by location (cloud.region, detected on
    # Cloud Run), job (service.name) and instance (service.instance.id: one
    # per process, so instances never overwrite each other's points).
    detected = GoogleCloudResourceDetector(raise_on_error=False).detect()
    return spans, metrics, resource.merge(detected).merge(Resource({"gcp.project_id": project}))


# -- what is recorded ----------------------------------------------------------


class CallSpan:
    """One call's span and in-flight count, from start_call to end_call."""

    __slots__ = ("attributes", "log_trace", "method", "span", "token")

    def __init__(self, span: Any, token: Any, attributes: dict[str, str], log_trace: Any) -> None:
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

    async def firestore_unary(self, method: str, call: Awaitable[Any]) -> Any:
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

    async def firestore_stream(self, method: str, call: Any) -> AsyncIterator[Any]:
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

    def _firestore_start(self, method: str) -> tuple[Any, float]:
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

    def _firestore_end(self, method: str, span: Any, started: float, code: str) -> None:
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
