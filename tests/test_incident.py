"""An incident rehearsal: Firestore freezes, and what the operators' alerts
and dashboard read must show it, then show the recovery.

A real server over the real Cloud Firestore emulator (its own, so freezing
it disturbs no other test), with telemetry to a local OTLP receiver and its
access lines captured. Three windows of steady load:

1. normal, with slow callers among the calls: BatchCreateTasks streams left
   idle past the server's idle limit, and past their own deadline. They end
   DEADLINE_EXCEEDED, and must not count as the server's errors;
2. frozen: the emulator is SIGSTOPped, so calls run into their deadlines;
3. thawed: SIGCONT, and once calls succeed again.

In each window the PromQL of every alert and dashboard tile that reads what
the server emits (the log-based metrics from the access lines, and the
OpenTelemetry histograms) is evaluated over what the server emitted in that
window (harness.promql: the rate over the window instead of 5 minutes, and
the condition's 5-minute duration not waited for). The alerts and tiles on
Google's own metrics (Cloud Run instances, Firestore's request counts) have
no local source and are listed, not rehearsed.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from tasks.v1 import task_service_pb2 as pb

from harness import emulator_jar, firestore_store, start_emulator, start_server
from harness.otlp import Receiver
from harness.promql import Series, access_line_series, evaluate, otel_histogram_series
from tests.helpers import create_request, loud_skip
from tests.test_telemetry import flush, telemetry_config

pytestmark = [pytest.mark.firestore, pytest.mark.slow]

SERVICE = "tasks-prod"
ROOT = Path(__file__).resolve().parent.parent
CALL_DEADLINE = 1.5  # above the 1,000 ms of the p99 alert
# The server's own: log-based metrics, and OpenTelemetry's over OTLP (quoted names).
SERVER_METRICS = ("logging_googleapis_com:user_", '{"grpc.')
PLATFORM_METRICS = ("run_googleapis_com:", "firestore_googleapis_com:")
OTEL_HISTOGRAMS = ("grpc.server.call.duration", "grpc.client.attempt.duration")


def _render(out: Path) -> tuple[dict[str, list[str]], dict[str, list[str]], Path]:
    """The alert conditions and dashboard tiles' queries, as deploy.sh renders them."""
    import sys

    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import monitoring  # deploy/monitoring.py
    finally:
        sys.path.pop(0)
    made = monitoring.render(out, SERVICE, "demo-proj")
    alerts: dict[str, list[str]] = {}
    tiles: dict[str, list[str]] = {}
    for kind, name, path in made:
        body = json.loads(path.read_text())
        if kind == "policy":
            alerts[name] = [
                c["conditionPrometheusQueryLanguage"]["query"] for c in body["conditions"]
            ]
        elif kind == "dashboard":
            for tile in body["mosaicLayout"]["tiles"]:
                queries = [
                    d["timeSeriesQuery"]["prometheusQuery"]
                    for d in tile["widget"].get("xyChart", {}).get("dataSets", [])
                ]
                if queries:
                    tiles[tile["widget"]["title"]] = queries
    return alerts, tiles, out / "log-metrics"


def _reads(queries: list[str], prefixes: tuple[str, ...]) -> bool:
    return any(p in q for q in queries for p in prefixes)


def _time(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["time"]).replace("Z", "+00:00")).timestamp()


class Window:
    """One stretch of the rehearsal: wall-clock bounds and OTLP snapshots."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = self.end = 0.0
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    def series(self, captured: io.StringIO, log_metrics: Path) -> Series:
        lines = [json.loads(x) for x in captured.getvalue().splitlines() if x.strip()]
        inside = [
            e
            for e in lines
            if e.get("logger") == "taskservice.access" and self.start <= _time(e) < self.end
        ]
        resource = {"monitored_resource": "cloud_run_revision", "service_name": SERVICE}
        series = access_line_series(inside, log_metrics, resource, self.end - self.start)
        for metric in OTEL_HISTOGRAMS:
            otel_histogram_series(
                series, metric, self.before[metric], self.after[metric], {"job": SERVICE}
            )
        return series


async def test_a_frozen_store_shows_on_every_alert_and_tile_that_reads_the_server(
    receiver: Receiver, captured: io.StringIO, tmp_path: Path
) -> None:
    jar = emulator_jar()
    if jar is None:
        loud_skip(
            "FIRESTORE TESTS SKIPPED: the Cloud Firestore emulator jar (or java) was not found"
            " (set FIRESTORE_EMULATOR_JAR); these tests did NOT run"
        )
    alerts, tiles, log_metrics = _render(tmp_path / "monitoring")
    rehearsed = {n: q for n, q in alerts.items() if _reads(q, SERVER_METRICS)}
    rehearsed_tiles = {n: q for n, q in tiles.items() if _reads(q, SERVER_METRICS)}
    # What is not rehearsed reads Google's metrics only (nothing local emits them).
    for name, queries in [*alerts.items(), *tiles.items()]:
        if name not in rehearsed and name not in rehearsed_tiles:
            assert _reads(queries, PLATFORM_METRICS), name
    assert len(rehearsed) == 2 and len(rehearsed_tiles) == 6, (rehearsed, rehearsed_tiles)

    emulator = start_emulator(jar, tmp_path / "emulator.log")
    store = firestore_store(emulator.host)
    running = await start_server(
        store,
        telemetry_config(
            receiver.endpoint,
            service_name=SERVICE,
            stream_idle_seconds=1.0,
            trace_sample_ratio=0.0,
            metrics_interval_seconds=60.0,
        ),
    )
    stub = running.stub
    stop = asyncio.Event()
    outcomes: dict[str, list[str]] = {}
    phase = "normal"

    async def caller(n: int) -> None:
        name = ""
        while not stop.is_set():
            try:
                if not name:
                    task = await stub.CreateTask(
                        create_request(f"c{n}", request_id=str(uuid.uuid4())),
                        timeout=CALL_DEADLINE,
                    )
                    name = task.name
                else:
                    await stub.GetTask(pb.GetTaskRequest(name=name), timeout=CALL_DEADLINE)
                outcomes.setdefault(phase, []).append("OK")
            except grpc.aio.AioRpcError as err:
                outcomes.setdefault(phase, []).append(err.code().name)
            await asyncio.sleep(0.05)

    async def slow_caller(deadline: float) -> None:
        """One task, then silence: the server's idle limit (1 s) or the
        caller's own deadline ends the stream."""

        async def then_silence() -> AsyncIterator[pb.CreateTaskRequest]:
            yield create_request("slow")
            await asyncio.sleep(10)

        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stub.BatchCreateTasks(then_silence(), timeout=deadline)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def snapshot(window: Window, which: str) -> None:
        await flush(running)
        await asyncio.sleep(0.2)  # the export has reached the receiver
        got = {m: dict(receiver.latest(m)) for m in OTEL_HISTOGRAMS}
        setattr(window, which, got)

    windows = {name: Window(name) for name in ("normal", "frozen", "thawed")}
    callers = [asyncio.ensure_future(caller(n)) for n in range(4)]
    frozen = False
    try:
        await asyncio.sleep(1)  # warm: every caller has its task
        normal = windows["normal"]
        await snapshot(normal, "before")
        normal.start = time.time()
        await asyncio.gather(slow_caller(30), slow_caller(30), slow_caller(0.6), slow_caller(0.6))
        await asyncio.sleep(0.5)
        normal.end = time.time()
        await snapshot(normal, "after")

        cold = windows["frozen"]
        cold.before = normal.after
        emulator.process.send_signal(signal.SIGSTOP)
        frozen = True
        phase = "frozen"
        cold.start = time.time()
        await asyncio.sleep(4)
        cold.end = time.time()
        await snapshot(cold, "after")

        emulator.process.send_signal(signal.SIGCONT)
        frozen = False
        phase = "thawing"
        thawed_at = time.monotonic()
        # Calls sent while frozen end within their deadline; then calls succeed.
        await asyncio.sleep(CALL_DEADLINE + 0.5)
        while outcomes.get("thawing", [])[-4:] != ["OK"] * 4:
            assert time.monotonic() - thawed_at < 20, outcomes.get("thawing")
            await asyncio.sleep(0.1)
        warm = windows["thawed"]
        await snapshot(warm, "before")
        phase = "thawed"
        warm.start = time.time()
        await asyncio.sleep(3)
        warm.end = time.time()
        await snapshot(warm, "after")
    finally:
        if frozen:
            emulator.process.send_signal(signal.SIGCONT)
        stop.set()
        await asyncio.gather(*callers, return_exceptions=True)
        await running.close()
        await store.close()
        emulator.stop()

    # What the callers saw: the incident, then none.
    assert set(outcomes["normal"]) == {"OK"}, outcomes["normal"]
    assert "DEADLINE_EXCEEDED" in outcomes["frozen"], outcomes["frozen"]
    assert set(outcomes["thawed"]) == {"OK"}, outcomes["thawed"]

    results: dict[str, dict[str, Any]] = {}
    for window in windows.values():
        series = window.series(captured, log_metrics)
        results[window.name] = {
            name: [evaluate(q, series) for q in queries]
            for name, queries in {**rehearsed, **rehearsed_tiles}.items()
        }
    print(f"INCIDENT rehearsal {json.dumps(_shown(results), indent=1)}")

    def fires(window: str, alert: str) -> bool:
        return any(bool(vector) for vector in results[window][alert])

    ratio_alert = next(n for n in rehearsed if "error ratio" in n)
    latency_alert = next(n for n in rehearsed if "p99 latency" in n)
    # The error ratio: quiet with slow callers, firing while frozen, quiet after.
    assert not fires("normal", ratio_alert)
    assert fires("frozen", ratio_alert)
    assert not fires("thawed", ratio_alert)
    assert not fires("normal", latency_alert)
    assert fires("frozen", latency_alert)
    assert not fires("thawed", latency_alert)

    # The slow callers were DEADLINE_EXCEEDED, the callers' doing: under a
    # ratio that counted every DEADLINE_EXCEEDED they would have fired it.
    codes = _only(results["normal"], "Calls per second by code and fault")
    assert codes.get(("DEADLINE_EXCEEDED", "caller"), 0) > 0, codes
    assert ("DEADLINE_EXCEEDED", "server") not in codes, codes
    frozen_codes = _only(results["frozen"], "Calls per second by code and fault")
    assert frozen_codes.get(("DEADLINE_EXCEEDED", "server"), 0) > 0, frozen_codes
    # Every frozen call ran into its deadline: none is logged as cancelled.
    assert ("CANCELLED", "caller") not in frozen_codes, frozen_codes
    thawed_codes = _only(results["thawed"], "Calls per second by code and fault")
    assert set(thawed_codes) == {("OK", "none")}, thawed_codes

    ratio_tile = next(n for n in rehearsed_tiles if n.startswith("Server-side error ratio"))
    assert _scalar(results["normal"][ratio_tile]) == 0
    assert _scalar(results["frozen"][ratio_tile]) > 0.5
    assert _scalar(results["thawed"][ratio_tile]) == 0

    # Latency, from the access lines (ms) and from OpenTelemetry (s).
    for tile, limit in (
        ("p99 latency by method (ms)", 1000),
        ("p99 server latency by method, OpenTelemetry (s; callers' slowness aside)", 1.0),
        ("p99 Firestore RPC latency by method, OpenTelemetry (s)", 1.0),
    ):
        assert max(_values(results["normal"][tile])) < limit, (tile, results["normal"][tile])
        assert max(_values(results["frozen"][tile])) > limit, (tile, results["frozen"][tile])
        assert max(_values(results["thawed"][tile])) < limit, (tile, results["thawed"][tile])
    assert max(_values(results["thawed"]["p50 latency by method (ms)"])) < 500


def _values(vectors: list[dict[Any, float]]) -> list[float]:
    found = [v for vector in vectors for v in vector.values()]
    assert found, "the tile shows nothing"
    return found


def _scalar(vectors: list[dict[Any, float]]) -> float:
    """A one-series tile's value; no series (a sum over no errors) is 0."""
    (vector,) = vectors
    assert len(vector) <= 1, vector
    return next(iter(vector.values()), 0.0)


def _only(results: dict[str, Any], tile: str) -> dict[tuple[str, str], float]:
    ((vector),) = results[tile]
    return {(dict(k)["code"], dict(k)["fault"]): v for k, v in vector.items()}


def _shown(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        window: {
            name: [{",".join(f"{k}={v}" for k, v in sorted(key)): round(value, 3)
                    for key, value in vector.items()} for vector in vectors]
            for name, vectors in by_name.items()
        }
        for window, by_name in results.items()
    }  # fmt: skip
