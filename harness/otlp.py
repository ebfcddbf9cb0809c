"""A small OTLP/gRPC receiver (the collector's trace and metrics services) for tests and bench.

It keeps every export request it is sent, with the request's metadata, and
reads them back as spans and as metric data points with their attributes.
With tls=(key PEM, certificate PEM) it listens over TLS, as the Telemetry API
(telemetry.googleapis.com) does, so that a test sees the bearer token a
Google-authenticated exporter sends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        value: common_pb2.AnyValue = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = getattr(value, kind) if kind else None
    return out


@dataclass
class Point:
    metric: str
    attributes: dict[str, Any]
    data: Any  # the OTLP data point (HistogramDataPoint, NumberDataPoint)


@dataclass
class Receiver:
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # each export's metadata
    server: grpc.aio.Server | None = None
    port: int = 0
    tls: bool = False

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def resources(self) -> list[dict[str, Any]]:
        """The resource attributes of every export, spans' and metrics'."""
        found = [attributes(r.resource.attributes) for t in self.traces for r in t.resource_spans]
        for request in self.metrics:
            found += [attributes(r.resource.attributes) for r in request.resource_metrics]
        return found

    def spans(self) -> list[trace_pb2.Span]:
        return [
            span
            for request in self.traces
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def points(self, metric: str) -> list[Point]:
        """Every data point of `metric`, in the order received (cumulative:
        the last one for a set of attributes is the total)."""
        found = []
        for request in self.metrics:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for m in scope.metrics:
                        if m.name != metric:
                            continue
                        kind = m.WhichOneof("data")
                        for point in getattr(m, kind).data_points:
                            found.append(Point(m.name, attributes(point.attributes), point))
        return found

    def latest(self, metric: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """The last data point of `metric` per attribute set."""
        return {tuple(sorted(p.attributes.items())): p.data for p in self.points(metric)}

    async def wait_for(self, what: Callable[[], Any], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = what()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"not received within {timeout} s")
            await asyncio.sleep(0.05)


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
        self.receiver.headers.append(dict(context.invocation_metadata()))
        self.receiver.traces.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
        self.receiver.headers.append(dict(context.invocation_metadata()))
        self.receiver.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def start_receiver(tls: tuple[bytes, bytes] | None = None) -> Receiver:
    receiver = Receiver(tls=tls is not None)
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(receiver), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(receiver), server)
    if tls is None:
        receiver.port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials([tls])
        receiver.port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    receiver.server = server
    return receiver


async def _serve_forever(port: int) -> None:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(receiver), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(receiver), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    while True:  # keep nothing: a collector that accepts and drops (bench.telemetry)
        receiver.traces.clear()
        receiver.metrics.clear()
        await asyncio.sleep(1)


if __name__ == "__main__":
    # python -m harness.otlp PORT: a receiver in a process of its own.
    import sys

    asyncio.run(_serve_forever(int(sys.argv[1])))
