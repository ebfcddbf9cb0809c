"""Evaluates the PromQL that deploy/monitoring's alerts and dashboard tiles
run, over series built from what a server emitted in one time window: its
access lines (through the log-based metric definitions, as Cloud Logging
would count them) and the OpenTelemetry histograms an OTLP receiver got.

Only the subset those queries use is supported (an unsupported node raises):
selectors with =, !=, =~, !~ matchers, rate() over a range (the rate over
the window given instead of the written range: a rehearsal compresses 5
minutes into seconds), sum with or without `by`, histogram_quantile (with
Prometheus's linear interpolation within a bucket), the arithmetic and
comparison operators between a vector and a number or two vectors with the
same labels, `and`, and parentheses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]


@dataclass
class Series:
    """Counter increases within one window, by metric name and label set."""

    window_seconds: float
    increases: dict[str, dict[Labels, float]] = field(default_factory=dict)

    def add(self, metric: str, labels: Mapping[str, str], value: float) -> None:
        by_labels = self.increases.setdefault(metric, {})
        key = frozenset(labels.items())
        by_labels[key] = by_labels.get(key, 0.0) + value

    def add_histogram(
        self, metric: str, labels: Mapping[str, str], bounds: Iterable[float], counts: list[float]
    ) -> None:
        """Per-bucket counts (len(bounds) + 1 of them) as cumulative _bucket series."""
        cumulative = 0.0
        for bound, count in zip([*bounds, math.inf], counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == math.inf else f"{bound:g}"
            self.add(f"{metric}_bucket", {**labels, "le": le}, cumulative)
        self.add(f"{metric}_count", labels, cumulative)


def access_line_series(
    lines: Iterable[dict[str, Any]],
    log_metrics: Path,
    resource: Mapping[str, str],
    window_seconds: float,
) -> Series:
    """The log-based metrics of deploy/monitoring/log-metrics (rendered) over
    these access lines, as `logging_googleapis_com:user_NAME`, with the
    resource labels given (service_name, monitored_resource)."""
    series = Series(window_seconds)
    for path in sorted(log_metrics.glob("*.json")):
        metric = json.loads(path.read_text())
        wanted = dict(re.findall(r'jsonPayload\.(\w+)="([^"]*)"', metric["filter"]))
        extract = {
            label: _field(expression) for label, expression in metric["labelExtractors"].items()
        }
        name = f"logging_googleapis_com:user_{metric['name']}"
        bounds = metric.get("bucketOptions", {}).get("explicitBuckets", {}).get("bounds")
        value_field = _field(metric["valueExtractor"]) if "valueExtractor" in metric else None
        for line in lines:
            if any(str(line.get(k)) != v for k, v in wanted.items()):
                continue
            labels = {**resource, **{k: str(line.get(f, "")) for k, f in extract.items()}}
            if value_field is None:
                series.add(name, labels, 1)
            else:
                assert bounds is not None, path
                counts = [0.0] * (len(bounds) + 1)
                value = float(line[value_field])
                counts[next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] = 1
                series.add_histogram(name, labels, bounds, counts)
    return series


def _field(expression: str) -> str:
    found = re.fullmatch(r'EXTRACT\(jsonPayload\.(?:"([^"]+)"|(\w+))\)', expression)
    assert found, expression
    return found.group(1) or found.group(2)


def otel_histogram_series(
    series: Series,
    metric: str,
    before: Mapping[Any, Any],
    after: Mapping[Any, Any],
    resource: Mapping[str, str],
) -> None:
    """Adds an OTLP histogram's increase between two cumulative snapshots
    (harness.otlp.Receiver.latest) as Cloud Monitoring names what arrives by
    OTLP (the Telemetry API) for PromQL: the OpenTelemetry name and attribute
    names as they are, dots included (queried quoted:
    `{"grpc.server.call.duration_bucket"}`), plus the resource labels given
    (job)."""
    name = metric
    for key, point in after.items():
        labels = {k: str(v) for k, v in key}
        counts = list(point.bucket_counts)
        earlier = before.get(key)
        if earlier is not None:
            counts = [a - b for a, b in zip(counts, earlier.bucket_counts, strict=True)]
        if sum(counts):
            series.add_histogram(name, {**labels, **resource}, list(point.explicit_bounds), counts)


def evaluate(query: str, series: Series) -> Vector:
    """The instant vector the query gives over the window's series."""
    return _eval(promql_parser.parse(query), series)


def _eval(node: Any, series: Series) -> Any:
    kind = type(node).__name__
    if kind == "NumberLiteral":
        return float(node.val)
    if kind == "ParenExpr":
        return _eval(node.expr, series)
    if kind == "Call":
        name = node.func.name
        if name == "rate":
            (selector,) = node.args
            return {
                k: v / series.window_seconds
                for k, v in _select(selector.vector_selector, series).items()
            }
        if name == "histogram_quantile":
            q, vector = (_eval(arg, series) for arg in node.args)
            return _quantiles(float(q), vector)
        raise NotImplementedError(name)
    if kind == "AggregateExpr":
        if str(node.op) != "sum" or node.param is not None:
            raise NotImplementedError(str(node.op))
        keep: list[str] = []
        if node.modifier is not None:
            if str(node.modifier.type) != "AggModifierType.By":
                raise NotImplementedError(str(node.modifier.type))
            keep = list(node.modifier.labels)
        out: Vector = {}
        for labels, value in _eval(node.expr, series).items():
            key = frozenset((k, v) for k, v in labels if k in keep)
            out[key] = out.get(key, 0.0) + value
        return out
    if kind == "BinaryExpr":
        return _binary(str(node.op), _eval(node.lhs, series), _eval(node.rhs, series))
    if kind == "VectorSelector":
        raise NotImplementedError("a selector outside rate()")
    raise NotImplementedError(kind)


def _select(selector: Any, series: Series) -> Vector:
    """metric{...}, or {"quoted.name", ...} (the name as a __name__ matcher)."""
    matchers = list(selector.matchers.matchers)
    name = selector.name
    if name is None:
        [named] = [m for m in matchers if m.name == "__name__"]
        assert str(named.op) == "MatchOp.Equal", named
        name = named.value
    matchers = [m for m in matchers if m.name != "__name__"]
    found = series.increases.get(name, {})
    out: Vector = {}
    for labels, value in found.items():
        have = dict(labels)
        if all(_matches(m, have.get(m.name, "")) for m in matchers):
            out[labels] = value
    return out


def _matches(matcher: Any, value: str) -> bool:
    op = str(matcher.op)
    if op == "MatchOp.Equal":
        return value == matcher.value
    if op == "MatchOp.NotEqual":
        return value != matcher.value
    if op == "MatchOp.Re":
        return re.fullmatch(matcher.value, value) is not None
    if op == "MatchOp.NotRe":
        return re.fullmatch(matcher.value, value) is None
    raise NotImplementedError(op)


_ARITHMETIC = {
    "/": lambda a, b: a / b if b else math.nan,
    "*": lambda a, b: a * b,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
}
_COMPARE = {
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
}


def _binary(op: str, lhs: Any, rhs: Any) -> Any:
    if op == "and":
        return {k: v for k, v in lhs.items() if k in rhs}
    if isinstance(lhs, float) and isinstance(rhs, float):
        raise NotImplementedError("number op number")
    if op in _COMPARE:
        compare = _COMPARE[op]
        if isinstance(rhs, float):
            return {k: v for k, v in lhs.items() if compare(v, rhs)}
        return {k: v for k, v in lhs.items() if k in rhs and compare(v, rhs[k])}
    arithmetic = _ARITHMETIC[op]
    if isinstance(rhs, float):
        return {k: arithmetic(v, rhs) for k, v in lhs.items()}
    if isinstance(lhs, float):
        return {k: arithmetic(lhs, v) for k, v in rhs.items()}
    return {k: arithmetic(v, rhs[k]) for k, v in lhs.items() if k in rhs}


def _quantiles(q: float, buckets: Vector) -> Vector:
    """Prometheus's histogram_quantile over cumulative `le` buckets."""
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for labels, count in buckets.items():
        le = dict(labels)["le"]
        key = frozenset((k, v) for k, v in labels if k != "le")
        groups.setdefault(key, []).append((math.inf if le == "+Inf" else float(le), count))
    out: Vector = {}
    for key, rows in groups.items():
        rows.sort()
        total = rows[-1][1]
        if total <= 0:
            continue
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in rows:
            if count >= rank:
                if bound == math.inf:  # in the open bucket: its lower bound
                    out[key] = lower_bound
                else:
                    width = count - lower_count
                    share = (rank - lower_count) / width if width else 0.0
                    out[key] = lower_bound + (bound - lower_bound) * share
                break
            lower_bound, lower_count = bound, count
    return out
