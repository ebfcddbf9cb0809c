"""Telemetry's export plumbing: the exporters (OTLP to a collector, or to
Google's Telemetry API with the Application Default Credentials' token on
each export, and the Google Cloud resource detector), wrapped so that a call
is never slower or failing because of one.

How: spans go to a bounded queue
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
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from taskservice import __version__
from taskservice.config import Config

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.telemetry")

SPAN_QUEUE = 2048
SPAN_BATCH = 512
EXPORT_TIMEOUT_SECONDS = 5.0
SHUTDOWN_SECONDS = 1.0  # after the drain: a last export, then give up (Cloud Run allows 10 s)
LOG_EVERY_SECONDS = 60.0
# gRFC A66's latency buckets (seconds).
LATENCY_BUCKETS = (
    0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004,
    0.005, 0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08,
    0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1, 2, 5, 10, 20, 50, 100,
)  # fmt: skip


_DEFAULTS = Config()  # each setting's declared default


@dataclass(frozen=True)
class TelemetrySettings:
    exporter: str  # "otlp" or "gcp"
    otlp_endpoint: str = _DEFAULTS.otlp_endpoint
    sample_ratio: float = _DEFAULTS.trace_sample_ratio
    metrics_interval_seconds: float = _DEFAULTS.metrics_interval_seconds
    service: str = _DEFAULTS.service_name
    revision: str = _DEFAULTS.revision
    project: str = _DEFAULTS.project


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
        # key -> [attributes, counts, sum, min, max]: a record of mixed types
        # updated in place on the hot path, so its items are left untyped.
        self._series: dict[Hashable, list[Any]] = {}
        self._lock = threading.Lock()

    def record(self, key: Hashable, attributes: dict[str, str], seconds: float) -> None:
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
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object
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

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
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
