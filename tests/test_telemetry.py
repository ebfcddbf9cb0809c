"""OpenTelemetry export over the wire, to a real OTLP receiver on loopback.

The server is real (TaskServer over a real store, called over a real
channel), the exporter is the real OTLP/gRPC one, and what arrives is read
from the receiver's requests: metrics by method and code with a latency, the
span of each call joined to the caller's trace with its store child spans,
and log lines naming the same span. A collector that is down changes no
call's outcome and no latency beyond noise.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import grpc
import pytest
from tasks.v1 import task_service_pb2 as pb

from harness import Running, free_port, start_server
from harness.otlp import Receiver, start_receiver
from taskservice.config import Config
from taskservice.domain.model import Task
from taskservice.observe.telemetry import OncePerMinute, Telemetry
from taskservice.store import TaskStore
from taskservice.store.sqlite import SqliteStore
from tests.helpers import create_request, eventually, expect_error, stream_of

GET = "tasks.v1.TaskService/GetTask"


class FailingGetStore(SqliteStore):
    """A real SQLite store whose get of one id fails the way a bug would."""

    async def get(self, task_id: str, timeout: float) -> Task:
        if task_id == "boom":
            raise RuntimeError("a bug")
        return await super().get(task_id, timeout)


def telemetry_config(endpoint: str, **kwargs: object) -> Config:
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "grace_seconds": 2.0,
        "telemetry": "otlp",
        "otlp_endpoint": endpoint,
        "trace_sample_ratio": 1.0,
        "metrics_interval_seconds": 1.0,
    }
    return Config(**{**settings, **kwargs})  # type: ignore[arg-type]


def telemetry_of(running: Running) -> Telemetry:
    telemetry = running.server.telemetry
    assert telemetry is not None
    return telemetry


async def flush(running: Running) -> None:
    """Exports now (the SDK's threads call the receiver, which this loop serves)."""
    await asyncio.to_thread(telemetry_of(running).flush)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_calls_arrive_by_method_and_code_with_latency(
    receiver: Receiver, tmp_path: Path
) -> None:
    running = await start_server(
        FailingGetStore(tmp_path / "t.db"), telemetry_config(receiver.endpoint)
    )
    try:
        task = await running.stub.CreateTask(create_request("one"))
        await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
        await expect_error(
            running.stub.GetTask(pb.GetTaskRequest(name="tasks/missing")),
            grpc.StatusCode.NOT_FOUND,
        )
        await expect_error(
            running.stub.GetTask(pb.GetTaskRequest(name="tasks/boom")), grpc.StatusCode.INTERNAL
        )
        await running.stub.BatchCreateTasks(stream_of([create_request(f"b{i}") for i in range(3)]))
        await flush(running)

        def durations() -> dict[tuple[str, str], object]:
            found = {}
            for key, point in receiver.latest("grpc.server.call.duration").items():
                attrs = dict(key)
                found[(attrs["grpc.method"], attrs["grpc.status"])] = point
            return found

        wanted = {(GET, "OK"), (GET, "NOT_FOUND"), (GET, "INTERNAL")}
        found = await receiver.wait_for(lambda: wanted <= durations().keys() and durations())
        for key in wanted:
            point = found[key]
            assert point.count == 1, key
            assert 0 < point.sum < 5, key  # seconds, the call's own latency
        assert found[("tasks.v1.TaskService/CreateTask", "OK")].count == 1
        started = receiver.latest("grpc.server.call.started")
        assert started[(("grpc.method", GET),)].as_int == 3
        in_flight = receiver.latest("taskservice.server.calls.in_flight")
        assert in_flight[(("grpc.method", GET),)].as_int == 0  # every call ended
        batch = receiver.latest("taskservice.server.stream.messages")
        key = (("direction", "received"), ("grpc.method", "tasks.v1.TaskService/BatchCreateTasks"))
        assert batch[key].count == 1 and batch[key].sum == 3
        commits = receiver.latest("taskservice.sqlite.commit.writes")
        assert commits[(("outcome", "committed"),)].sum >= 2  # the create and the batch

        # One SERVER span per call, with its code; the writes' commit as child spans.
        spans = await receiver.wait_for(
            lambda: len([s for s in receiver.spans() if s.name == GET]) >= 3 and receiver.spans()
        )
        codes = sorted(
            next(a.value.string_value for a in s.attributes if a.key == "rpc.response.status_code")
            for s in spans
            if s.name == GET
        )
        assert codes == ["INTERNAL", "NOT_FOUND", "OK"]
        create = next(s for s in spans if s.name == "tasks.v1.TaskService/CreateTask")
        commit = [
            s for s in spans if s.name == "sqlite.commit" and s.parent_span_id == create.span_id
        ]
        assert len(commit) == 1 and commit[0].trace_id == create.trace_id
        assert create.start_time_unix_nano <= commit[0].start_time_unix_nano
        assert commit[0].end_time_unix_nano <= create.end_time_unix_nano
    finally:
        await running.close()


def request_emulator_host(store: TaskStore) -> str:
    """host:port of the emulator a Firestore store calls (its channel's target)."""
    target = getattr(store, "target", "")
    assert target.startswith("dns:///127.0.0.1:"), target
    return str(target).removeprefix("dns:///")


@pytest.mark.parametrize("header", ["traceparent", "x-cloud-trace-context"])
async def test_a_call_span_joins_the_callers_trace_with_store_children(
    receiver: Receiver, store: TaskStore, captured: io.StringIO, header: str
) -> None:
    # The server names the project its log lines' traces are in.
    running = await start_server(store, telemetry_config(receiver.endpoint, project="demo-proj"))
    try:
        task = await running.stub.CreateTask(create_request("traced"))
        trace_id = uuid.uuid4().hex
        parent = uuid.uuid4().hex[:16]
        value = (
            f"00-{trace_id}-{parent}-01"
            if header == "traceparent"
            else f"{trace_id}/{int(parent, 16)};o=1"
        )
        await running.stub.UpdateTask(
            pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="traced, then updated")),
            metadata=((header, value),),
        )
        await flush(running)

        def tree() -> list[object]:
            return [s for s in receiver.spans() if s.trace_id.hex() == trace_id]

        await receiver.wait_for(lambda: len(tree()) >= 2)
        spans = tree()
        server = next(s for s in spans if s.name == "tasks.v1.TaskService/UpdateTask")
        assert server.parent_span_id.hex() == parent  # a child of the caller's span
        assert server.kind == server.SPAN_KIND_SERVER
        children = [s for s in spans if s.parent_span_id == server.span_id]
        if store.kind == "firestore":
            names = {s.name for s in children}
            assert "google.firestore.v1.Firestore/Commit" in names, names
            for child in children:
                assert child.kind == child.SPAN_KIND_CLIENT
                assert server.start_time_unix_nano <= child.start_time_unix_nano
                assert child.end_time_unix_nano <= server.end_time_unix_nano
            durations = receiver.latest("grpc.client.attempt.duration")
            # gRFC A66: client metrics carry the channel's canonical target.
            target = "dns:///" + request_emulator_host(store)
            assert (
                ("grpc.method", "google.firestore.v1.Firestore/Commit"),
                ("grpc.status", "OK"),
                ("grpc.target", target),
            ) in durations
        else:
            assert [s.name for s in children] == ["sqlite.commit"]
        # The call's log lines name the same trace and span.
        access = [
            e for e in _lines(captured) if e.get("grpc.method") == "tasks.v1.TaskService/UpdateTask"
        ]
        assert len(access) == 1, access
        assert access[0]["logging.googleapis.com/trace"] == f"projects/demo-proj/traces/{trace_id}"
        assert access[0]["logging.googleapis.com/spanId"] == server.span_id.hex()
        assert access[0]["logging.googleapis.com/trace_sampled"] is True
    finally:
        await running.close()


async def test_an_unsampled_caller_is_not_traced_but_counted(
    receiver: Receiver, tmp_path: Path
) -> None:
    running = await start_server(
        SqliteStore(tmp_path / "t.db"), telemetry_config(receiver.endpoint)
    )
    try:
        trace_id = uuid.uuid4().hex
        await expect_error(
            running.stub.GetTask(
                pb.GetTaskRequest(name="tasks/none"),
                metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-00"),),
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await flush(running)
        durations = await receiver.wait_for(lambda: receiver.latest("grpc.server.call.duration"))
        key = (("grpc.method", GET), ("grpc.status", "NOT_FOUND"), ("taskservice.fault", "caller"))
        assert key in durations
        assert not [s for s in receiver.spans() if s.trace_id.hex() == trace_id]
    finally:
        await running.close()


async def _latencies(running: Running, name: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await running.stub.GetTask(pb.GetTaskRequest(name=name))
        out.append((time.perf_counter() - started) * 1000)
    return out


async def test_a_dead_collector_changes_no_outcome_or_latency(
    receiver: Receiver, tmp_path: Path, captured: io.StringIO
) -> None:
    """The same telemetry, exporting every 0.2 s, to a collector that is down
    ("on") and to one that is up ("off" below: the baseline)."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    on = await start_server(
        SqliteStore(tmp_path / "on.db"), telemetry_config(dead, metrics_interval_seconds=0.2)
    )
    off = await start_server(
        SqliteStore(tmp_path / "off.db"),
        telemetry_config(receiver.endpoint, metrics_interval_seconds=0.2),
    )
    try:
        names = {}
        for label, running in (("on", on), ("off", off)):
            names[label] = (await running.stub.CreateTask(create_request("x"))).name
        await _latencies(on, names["on"], 50)  # warm both
        await _latencies(off, names["off"], 50)
        with_dead: list[float] = []
        without: list[float] = []
        for _ in range(10):  # interleaved rounds: the machine's noise hits both alike
            with_dead += await _latencies(on, names["on"], 40)
            without += await _latencies(off, names["off"], 40)
        p50_on, p50_off = statistics.median(with_dead), statistics.median(without)
        p99_on = sorted(with_dead)[int(0.99 * len(with_dead))]
        p99_off = sorted(without)[int(0.99 * len(without))]
        print(
            f"TELEMETRY dead collector: GetTask p50 {p50_on:.2f} ms vs {p50_off:.2f} ms live,"
            f" p99 {p99_on:.2f} vs {p99_off:.2f}, max {max(with_dead):.1f} ms"
        )
        assert len(with_dead) == 400  # every call succeeded (GetTask raised otherwise)
        assert p50_on < p50_off * 1.5 + 0.5
        # An export that blocked a call would hold it for the exporter's 5 s timeout.
        assert max(with_dead) < 1000
        telemetry = telemetry_of(on)
        # It did try, and failed (each export retries for up to 5 s first).
        failed = await eventually(
            lambda: (
                telemetry.metric_exporter.failures.count + telemetry.span_exporter.failures.count
            ),
            timeout=10,
            interval=0.05,
        )
        assert failed
    finally:
        started = time.perf_counter()
        await on.close()
        closing = time.perf_counter() - started
        await off.close()
    assert closing < 3.0, closing  # the last export does not hold up the drain
    failures = [
        e for e in _lines(captured) if str(e.get("message", "")).startswith("telemetry: exporting")
    ]
    assert 1 <= len(failures) <= 2, failures  # metrics and spans, once each per minute
    sdk = [e for e in _lines(captured) if str(e.get("logger", "")).startswith("opentelemetry")]
    per_logger: dict[str, int] = {}
    for e in sdk:
        per_logger[str(e["logger"])] = per_logger.get(str(e["logger"]), 0) + 1
    assert all(n == 1 for n in per_logger.values()), per_logger


def test_once_per_minute_holds_back_and_counts() -> None:
    limit = OncePerMinute(every=60)
    record = logging.LogRecord(
        "opentelemetry.x", logging.WARNING, "f", 1, "failed %s", ("a",), None
    )
    assert limit.filter(record)
    assert not limit.filter(logging.LogRecord("opentelemetry.x", 30, "f", 1, "again", (), None))
    other = logging.LogRecord("opentelemetry.y", logging.WARNING, "f", 1, "other", (), None)
    assert limit.filter(other)
    limit._last["opentelemetry.x"] -= 61
    later = logging.LogRecord("opentelemetry.x", logging.WARNING, "f", 1, "later", (), None)
    assert limit.filter(later) and later.getMessage() == "later (1 similar messages held back)"


class _TokenEndpoint(BaseHTTPRequestHandler):
    """Google's OAuth token endpoint, as a service account's credentials call
    it (a JWT grant in, an access token out): the HTTP boundary of google-auth."""

    issued: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        assert "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in body
        token = f"ya29.test-{len(self.issued)}"
        self.issued.append(token)
        reply = json.dumps({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args: object) -> None:
        pass


def _service_account_key(token_uri: str) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "type": "service_account",
        "project_id": "demo-proj",
        "private_key_id": "k1",
        "private_key": pem.decode(),
        "client_email": "taskservice-run@demo-proj.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }


async def test_gcp_exports_otlp_over_tls_with_googles_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TASKSERVICE_TELEMETRY=gcp: OTLP over TLS to the Telemetry API, each
    export carrying the bearer token google-auth got for the service account,
    and the project named in the resource. The endpoint is a local TLS stand-in
    and the token endpoint a local HTTP one: nothing else is faked."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    tokens = ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    key = tmp_path / "sa.json"
    key.write_text(json.dumps(_service_account_key(f"http://127.0.0.1:{tokens.server_port}/token")))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(tmp_path / "cert.pem"))
    receiver = await start_receiver(
        tls=((tmp_path / "key.pem").read_bytes(), (tmp_path / "cert.pem").read_bytes())
    )
    assert receiver.endpoint.startswith("https://")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated exporter
        running = await start_server(
            SqliteStore(tmp_path / "t.db"),
            telemetry_config(receiver.endpoint, telemetry="gcp", project="demo-proj"),
        )
    try:
        task = await running.stub.CreateTask(create_request("to Google"))
        await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
        await flush(running)
        await receiver.wait_for(lambda: receiver.spans() and receiver.points(
            "grpc.server.call.duration"))  # fmt: skip
        assert {s.name for s in receiver.spans()} >= {GET, "tasks.v1.TaskService/CreateTask"}
        assert _TokenEndpoint.issued, "google-auth never asked the token endpoint"
        bearer = {f"Bearer {t}" for t in _TokenEndpoint.issued}
        assert receiver.headers and all(h.get("authorization") in bearer for h in receiver.headers)
        for resource in receiver.resources():
            assert resource["gcp.project_id"] == "demo-proj"
            assert resource["service.name"] == "taskservice"
            assert resource["service.instance.id"]  # Cloud Monitoring's `instance`
        loaded = [m for m in sys.modules if m.startswith("opentelemetry.exporter.cloud_")]
        assert not loaded, loaded
    finally:
        await running.close()
        assert receiver.server is not None
        await receiver.server.stop(0)
        tokens.shutdown()


@pytest.mark.parametrize("ratio", [0.0, 1.0])
async def test_on_cloud_run_its_sampling_decision_is_followed_not_the_ratio(
    receiver: Receiver, tmp_path: Path, ratio: float
) -> None:
    """Cloud Run puts a traceparent on every request, sampled (flag 01) for
    about 0.1 requests/s per instance: the server follows that flag whatever
    TASKSERVICE_TRACE_SAMPLE_RATIO says, so that its spans join the traces
    Cloud Run records and no span hangs from a request span Cloud Run did not
    keep. The ratio applies only to calls that arrive without a trace header."""
    running = await start_server(
        SqliteStore(tmp_path / "t.db"),
        telemetry_config(receiver.endpoint, trace_sample_ratio=ratio),
    )
    try:
        task = await running.stub.CreateTask(create_request("sampled?"))  # no header
        traces = {flag: uuid.uuid4().hex for flag in ("01", "00")}
        for flag, trace_id in traces.items():
            header = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-{flag}"
            await running.stub.GetTask(
                pb.GetTaskRequest(name=task.name), metadata=(("traceparent", header),)
            )
        await flush(running)
        await receiver.wait_for(
            lambda: any(s.trace_id.hex() == traces["01"] for s in receiver.spans())
        )
        await flush(running)  # anything else pending has been sent too
        traced = {s.trace_id.hex() for s in receiver.spans()}
        assert traces["00"] not in traced  # Cloud Run did not sample it: neither do we
        headerless = [s for s in receiver.spans() if s.name.endswith("/CreateTask")]
        assert len(headerless) == (1 if ratio == 1.0 else 0)  # only here does the ratio decide
    finally:
        await running.close()
