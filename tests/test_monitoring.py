"""deploy/monitoring: log-based metrics, alert policies and dashboard, as deploy.sh renders them.

Each object is parsed strictly into the Cloud API's own message type
(LogMetric, AlertPolicy, Dashboard: an unknown or misspelt field fails), each
PromQL query is parsed by a PromQL parser, the metrics and labels the queries
name are the ones the log-based metrics define, and the fields those metrics
extract are the ones a real access line of a real server carries.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from google.cloud.logging_v2.types import LogMetric
from google.cloud.monitoring_dashboard_v1.types import Dashboard
from google.cloud.monitoring_v3.types import AlertPolicy
from tasks.v1 import task_service_pb2 as pb

from harness import Emulator, firestore_store, start_server
from harness.otlp import start_receiver
from taskservice.config import Config
from taskservice.observe.telemetry import SERVER_ERROR_CODES
from taskservice.store.sqlite import SqliteStore
from tests.helpers import create_request

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHANNEL = "projects/demo-proj/notificationChannels/42"
USER_METRIC = re.compile(
    r"logging_googleapis_com:user_([a-z_]+?)(?:_bucket|_count|_sum)?\{([^}]*)\}"
)
LABEL = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"')


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, Path]]]:
    out = tmp_path_factory.mktemp("monitoring")
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "monitoring.py"), "render", "--service", "tasks-prod",
         "--project", "demo-proj", "--out", str(out), "--notify", CHANNEL],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    made: dict[str, list[tuple[str, Path]]] = {}
    for line in result.stdout.splitlines():
        kind, name, path = line.split("\t")
        made.setdefault(kind, []).append((name, Path(path)))
    return made


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _queries(policy: dict[str, Any]) -> list[str]:
    return [c["conditionPrometheusQueryLanguage"]["query"] for c in policy["conditions"]]


def test_everything_is_rendered(rendered: dict[str, list[tuple[str, Path]]]) -> None:
    assert sorted(n for n, _ in rendered["metric"]) == [
        "taskservice_grpc_calls",
        "taskservice_grpc_latency",
    ]
    assert len(rendered["policy"]) == 4 and len(rendered["dashboard"]) == 1
    for paths in rendered.values():
        for _, path in paths:
            assert "${" not in path.read_text(), path


def test_log_metrics_are_valid_and_read_what_access_lines_carry(
    rendered: dict[str, list[tuple[str, Path]]], access_line: dict[str, Any]
) -> None:
    for name, path in rendered["metric"]:
        text = path.read_text()
        metric = LogMetric.from_json(text)  # strict: unknown fields fail
        assert metric.name == name
        # One definition for every service in the project (a second deploy would
        # otherwise rescope it): alerts and tiles select the service.
        assert "service_name" not in metric.filter
        body = json.loads(text)
        keys = {label["key"] for label in body["metricDescriptor"]["labels"]}
        assert set(body["labelExtractors"]) == keys == {"method", "code", "fault"}
        extractors = [*body["labelExtractors"].values(), body.get("valueExtractor", "")]
        for extractor in filter(None, extractors):
            field = re.fullmatch(r'EXTRACT\(jsonPayload\.(?:"([^"]+)"|(\w+))\)', extractor)
            assert field, extractor
            assert (field.group(1) or field.group(2)) in access_line, extractor
        assert 'jsonPayload.logger="taskservice.access"' in metric.filter
        assert access_line["logger"] == "taskservice.access"
    latency = _json(dict(rendered["metric"])["taskservice_grpc_latency"])
    bounds = latency["bucketOptions"]["explicitBuckets"]["bounds"]
    assert bounds == sorted(bounds) and latency["metricDescriptor"]["unit"] == "ms"
    assert isinstance(access_line["latency_ms"], float)


@pytest.fixture
async def access_line(tmp_path: Path, captured: io.StringIO) -> dict[str, Any]:
    """One access line of a real server, as Cloud Logging would receive it."""
    running = await start_server(SqliteStore(tmp_path / "t.db"))
    task = await running.stub.CreateTask(create_request("logged"))
    await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
    await running.close()
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    return next(e for e in lines if e.get("grpc.method") == "tasks.v1.TaskService/GetTask")


def test_alert_policies_are_valid(rendered: dict[str, list[tuple[str, Path]]]) -> None:
    metrics = {n: _json(p) for n, p in rendered["metric"]}
    for name, path in rendered["policy"]:
        policy = AlertPolicy.from_json(path.read_text())  # strict
        body = _json(path)
        assert policy.display_name == name and name.startswith("TaskService tasks-prod: ")
        assert list(policy.notification_channels) == [CHANNEL]
        assert policy.severity in (AlertPolicy.Severity.ERROR, AlertPolicy.Severity.WARNING)
        assert "**First check:**" in policy.documentation.content
        for condition in body["conditions"]:
            assert condition["conditionPrometheusQueryLanguage"]["duration"] == "300s"
        for query in _queries(body):
            promql_parser.parse(query)  # raises on a syntax error
            for metric, selector in USER_METRIC.findall(query):
                assert metric in metrics, metric
                defined = {label["key"] for label in metrics[metric]["metricDescriptor"]["labels"]}
                used = set(LABEL.findall(selector)) - {"monitored_resource", "service_name"}
                assert used <= defined, (metric, used)


def test_the_error_ratio_counts_server_side_codes_only(
    rendered: dict[str, list[tuple[str, Path]]],
) -> None:
    policy = next(_json(p) for n, p in rendered["policy"] if "error ratio" in n)
    (query,) = _queries(policy)
    codes = re.search(r'code=~"([^"]+)"', query)
    assert codes and set(codes.group(1).split("|")) == set(SERVER_ERROR_CODES)
    assert "NOT_FOUND" not in query and "INVALID_ARGUMENT" not in query
    # Only what the server caused: a slow caller's DEADLINE_EXCEEDED is not.
    numerator = query.split(" / ")[0]
    assert 'fault="server"' in numerator and 'fault="server"' not in query.split(" / ")[1]
    assert re.search(r"\) > 0\.01 and ", query)  # the rendered threshold
    instances = next(_json(p) for n, p in rendered["policy"] if "max-instances" in n)
    (query,) = _queries(instances)
    assert query.endswith(">= 16")  # 80% of deploy/service.yaml's maxScale of 20


def test_the_dashboard_is_valid(rendered: dict[str, list[tuple[str, Path]]]) -> None:
    ((name, path),) = rendered["dashboard"]
    dashboard = Dashboard.from_json(path.read_text())  # strict
    assert dashboard.display_name == name == "TaskService tasks-prod"
    cells: set[tuple[int, int]] = set()
    charts = 0
    for tile in _json(path)["mosaicLayout"]["tiles"]:
        assert tile["xPos"] + tile["width"] <= 48
        area = {
            (x, y)
            for x in range(tile["xPos"], tile["xPos"] + tile["width"])
            for y in range(tile["yPos"], tile["yPos"] + tile["height"])
        }
        assert not area & cells, tile["widget"]["title"]  # tiles do not overlap
        cells |= area
        for data_set in tile["widget"].get("xyChart", {}).get("dataSets", []):
            promql_parser.parse(data_set["timeSeriesQuery"]["prometheusQuery"])
            charts += 1
    assert charts >= 8


def test_a_broken_query_is_caught() -> None:
    with pytest.raises(Exception, match="paren"):
        promql_parser.parse("sum(rate(logging_googleapis_com:user_taskservice_grpc_calls[5m])")


def test_deploy_applies_them_after_the_service() -> None:
    """deploy.sh renders them, then applies them with deploy/monitoring.py
    (the client libraries: GA gcloud has no alert policy commands), after the
    service; tests/test_deploy.py runs that against a stand-in of the APIs."""
    result = subprocess.run(
        ["bash", str(DEPLOY / "deploy.sh"), "--project", "demo-proj", "--region",
         "europe-west1", "--dry-run", "--notify", CHANNEL],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    replace = next(i for i, c in enumerate(commands) if c.startswith("gcloud run services replace"))
    rendered = Path(re.search(r"# rendered monitoring: (\S+)", result.stdout).group(1))  # type: ignore[union-attr]
    apply = f"{sys.executable} {DEPLOY / 'monitoring.py'} apply --project demo-proj {rendered}"
    assert commands[replace + 1 :] == [apply]
    assert not [c for c in commands if " monitoring " in c or " alpha " in c or " beta " in c]
    assert len(list((rendered / "log-metrics").glob("*.json"))) == 2
    assert len(list((rendered / "alerts").glob("*.json"))) == 4
    assert (rendered / "dashboard.json").is_file()
    for path in (rendered / "alerts").glob("*.json"):
        assert _json(path)["notificationChannels"] == [CHANNEL]


# metric{labels}, or {"an.otel.name", labels} (OTLP metrics keep their dots).
SELECTOR = re.compile(r'([a-z_]+:[a-z_]+)(\{[^}]*\})?|\{"([a-z][a-z0-9_.]*)"([^}]*)\}')
# The label that scopes each source of metrics to one service or database.
SCOPES = {
    "logging_googleapis_com:": ('service_name="tasks-prod"',),
    "run_googleapis_com:": ('service_name="tasks-prod"',),
    "grpc.": ('job="tasks-prod"',),  # OpenTelemetry, over OTLP
    "firestore_googleapis_com:": ('project_id="demo-proj"', 'database_id="(default)"'),
}


def test_every_alert_and_tile_reads_one_service_and_one_database(
    rendered: dict[str, list[tuple[str, Path]]],
) -> None:
    """A second service (the README's watcher) or database in the project
    must not mix into this one's alerts and tiles."""
    queries = [q for _, path in rendered["policy"] for q in _queries(_json(path))]
    ((_, dashboard),) = rendered["dashboard"]
    for tile in _json(dashboard)["mosaicLayout"]["tiles"]:
        for data_set in tile["widget"].get("xyChart", {}).get("dataSets", []):
            queries.append(data_set["timeSeriesQuery"]["prometheusQuery"])
    selectors = [
        (q, name or otel_name, labels or otel_labels)
        for q in queries
        for name, labels, otel_name, otel_labels in SELECTOR.findall(q)
    ]
    assert len(selectors) >= 15
    for query, name, labels in selectors:
        prefix = next(p for p in SCOPES if name.startswith(p))
        for scope in SCOPES[prefix]:
            assert scope in labels, (name, query)


def test_the_database_is_a_rendering_choice(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(DEPLOY / "monitoring.py"), "render", "--service", "tasks-prod",
         "--project", "demo-proj", "--database", "tasks-eu", "--out", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    firestore = (tmp_path / "alerts" / "firestore-errors.json").read_text()
    assert 'database_id=\\"tasks-eu\\"' in firestore and "(default)" not in firestore


OTEL_METRIC = re.compile(r'\{"([a-z][a-z0-9_.]*?)(?:_bucket|_count|_sum)?"[,}]')


async def test_the_dashboards_opentelemetry_tiles_read_what_the_server_exports(
    rendered: dict[str, list[tuple[str, Path]]], emulator: Emulator
) -> None:
    """The OpenTelemetry tiles query the metrics as the Telemetry API stores
    OTLP (names and attribute keys as sent, quoted for PromQL): each metric and
    label they name is one a real server exports over OTLP."""
    ((_, path),) = rendered["dashboard"]
    queries = [
        data_set["timeSeriesQuery"]["prometheusQuery"]
        for tile in _json(path)["mosaicLayout"]["tiles"]
        for data_set in tile["widget"].get("xyChart", {}).get("dataSets", [])
    ]
    # (workload.googleapis.com was the deprecated Cloud Monitoring exporter's domain)
    assert not [q for q in queries if "workload_googleapis_com" in q]
    otel = [q for q in queries if OTEL_METRIC.search(q)]
    assert len(otel) == 2, otel  # server latency, Firestore RPC latency
    receiver = await start_receiver()
    config = Config(
        host="127.0.0.1", port=0, telemetry="otlp", otlp_endpoint=receiver.endpoint,
        metrics_interval_seconds=1.0,
    )  # fmt: skip
    store = firestore_store(emulator.host)  # the Firestore tile: its RPCs' metrics
    running = await start_server(store, config)
    try:
        task = await running.stub.CreateTask(create_request("exported"))
        await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
        telemetry = running.server.telemetry
        assert telemetry is not None
        await asyncio.to_thread(telemetry.flush)
        for query in otel:
            for metric in OTEL_METRIC.findall(query):
                points = await receiver.wait_for(lambda m=metric: receiver.points(m))
                by = re.search(r"by \(([^)]*)\)", query)
                labels = {b.strip().strip('"') for b in by.group(1).split(",")} if by else set()
                assert labels - {"le"} <= set(points[0].attributes), (metric, labels)
    finally:
        await running.close()
        await store.close()
        assert receiver.server is not None
        await receiver.server.stop(0)
