"""`python -m taskservice` as an operator runs it: configuration, start, SIGTERM, restart."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import Emulator, ServerProcess, free_port, health_serving, server_env
from tests.helpers import create_request, json_lines, loud_skip

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    """The environment as an operator's shell has it, at INFO with access
    lines: scrubbed of whatever would pick another store."""
    return server_env({"LOG_LEVEL": "INFO", "TASKSERVICE_ACCESS_LOG": "on", **extra})


@pytest.fixture
def launch() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for p in started:
        p.kill()


def _start(
    started: list[ServerProcess], env: dict[str, str], cwd: Path, args: Sequence[str] = ()
) -> ServerProcess:
    p = ServerProcess(env, cwd, port=int(env["PORT"]), args=args)
    started.append(p)
    return p


def _exit_code(p: ServerProcess, timeout: float) -> int:
    return p.finish(timeout)[0]


@pytest.fixture
async def channel_to() -> AsyncIterator[list[grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []
    yield channels
    for c in channels:
        await c.close()


async def test_sqlite_default_serves_keeps_data_and_stops_cleanly_on_sigterm(
    launch: list[ServerProcess], tmp_path: Path, channel_to: list[grpc.aio.Channel]
) -> None:
    port = free_port()
    env = _env(PORT=str(port))
    p = _start(launch, env, tmp_path)  # default store: sqlite at ./tasks.db
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    channel_to.append(channel)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    await health_serving(health_pb2_grpc.HealthStub(channel))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    task = await stub.CreateTask(
        create_request("persisted", task_id="keep-me"),
        timeout=5,
        metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),),
    )
    p.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(_exit_code, p, 10) == 0
    lines = json_lines(p.output)
    start = [entry for entry in lines if "listening on" in entry["message"]]
    assert len(start) == 1 and start[0]["store"] == "sqlite" and str(port) in start[0]["address"]
    assert str(tmp_path / "tasks.db") in start[0]["message"]  # which file it uses
    assert start[0]["store_target"] == f"SQLite file {tmp_path / 'tasks.db'}"
    assert all({"severity", "message", "time"} <= entry.keys() for entry in lines)
    # The access line, written by the process's own handler (the short cut in
    # taskservice.observe.jsonlog.log_fields), buffered and still flushed by exit.
    [access] = [e for e in lines if e.get("grpc.method") == "tasks.v1.TaskService/CreateTask"]
    assert access["severity"] == "INFO" and access["logger"] == "taskservice.access"
    assert access["message"] == "tasks.v1.TaskService/CreateTask OK"
    assert access["grpc.code"] == "OK" and access["trace_id"] == trace_id
    assert access["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert access["request_bytes"] > 0 and access["response_bytes"] > 0
    assert access["latency_ms"] > 0 and access["peer"].startswith("ipv4:127.0.0.1:")
    assert (tmp_path / "tasks.db").exists()

    p2 = _start(launch, env, tmp_path)
    await health_serving(health_pb2_grpc.HealthStub(channel))
    assert await stub.GetTask(pb.GetTaskRequest(name="tasks/keep-me"), timeout=5) == task
    p2.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(_exit_code, p2, 10) == 0


async def test_sigterm_lets_an_in_flight_stream_finish_and_refuses_new_calls(
    launch: list[ServerProcess], tmp_path: Path, channel_to: list[grpc.aio.Channel]
) -> None:
    port = free_port()
    p = _start(
        launch,
        _env(PORT=str(port), TASKSERVICE_SQLITE_PATH=str(tmp_path / "db" / "t.db")),
        tmp_path,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    channel_to.append(channel)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    await health_serving(health_pb2_grpc.HealthStub(channel))
    sent = asyncio.Event()

    async def slow_stream() -> AsyncIterator[pb.CreateTaskRequest]:
        for i in range(10):
            yield create_request(f"t{i}")
            if i == 2:
                sent.set()
            await asyncio.sleep(0.1)

    batch = asyncio.ensure_future(stub.BatchCreateTasks(slow_stream(), timeout=10))
    await sent.wait()
    started = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.1)
    p.proc.send_signal(signal.SIGTERM)  # a second one must not cut the drain short
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetTask(pb.GetTaskRequest(name="tasks/x"), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    response = await batch
    assert len(response.tasks) == 10
    assert await asyncio.to_thread(_exit_code, p, 10) == 0
    assert time.monotonic() - started < 9


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskservice", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed start prints; nothing else anywhere."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and ".cc:" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({"PORT": "eighty"}, [], "PORT"),
        ({"PORT": "70000"}, [], "PORT"),
        ({"PORT": ""}, [], "PORT is set but empty"),
        ({"LOG_LEVEL": "LOUD"}, [], "LOG_LEVEL='LOUD' must be one of"),
        ({"TASKSERVICE_STORE": "mongo"}, [], "TASKSERVICE_STORE"),
        ({}, ["--store", "mongo"], "--store"),
        ({}, ["--port", "x"], "PORT='x' is not an integer"),
        ({}, ["--serve-forever"], "unrecognized arguments"),
        ({"TASKSERVICE_COLLECTION": "a/b"}, [], "TASKSERVICE_COLLECTION"),
        ({"FIRESTORE_EMULATOR_HOST": "no port"}, [], "FIRESTORE_EMULATOR_HOST"),
        (
            {"TASKSERVICE_STORE": "firestore", "GOOGLE_CLOUD_PROJECT": "Bad_Project"},
            [],
            "GOOGLE_CLOUD_PROJECT",
        ),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    tmp_path: Path, env: dict[str, str], args: list[str], needle: str
) -> None:
    assert needle in _one_line(_run(args, _env(**env), tmp_path))


def test_help_lists_every_setting_and_binds_nothing(tmp_path: Path) -> None:
    from taskservice.config import SETTINGS

    with socket.socket() as holder:  # the default port, taken: --help must not care
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        for flag in ("--help", "-h"):
            result = _run([flag], _env(PORT=str(port)), tmp_path)
            assert result.returncode == 0 and result.stderr == ""
            for setting in SETTINGS:
                assert setting.env in result.stdout
            for option in ("--port", "--store", "--sqlite-path", "--version", "default: 8080"):
                assert option in result.stdout
    version = _run(["--version"], _env(), tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("taskservice ")
    assert not (tmp_path / "tasks.db").exists()


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = _one_line(_run(["--port", str(port)], _env(), tmp_path))
    assert f"port {port} is already in use" in line and "--port" in line


def test_firestore_without_credentials_says_what_to_do(tmp_path: Path) -> None:
    env = _env(
        GOOGLE_CLOUD_PROJECT="my-project",
        HOME=str(tmp_path),  # no gcloud application-default credentials
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        GCE_METADATA_HOST="127.0.0.1:9",  # no metadata server either
        GCE_METADATA_IP="127.0.0.1:9",
    )
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    line = _one_line(_run([], env, tmp_path))
    assert "gcloud auth application-default login" in line
    assert "FIRESTORE_EMULATOR_HOST" in line and "--store sqlite" in line


def test_gcp_telemetry_without_credentials_says_what_to_do(tmp_path: Path) -> None:
    env = _env(
        TASKSERVICE_STORE="sqlite",
        TASKSERVICE_TELEMETRY="gcp",
        HOME=str(tmp_path),
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        GCE_METADATA_HOST="127.0.0.1:9",
        GCE_METADATA_IP="127.0.0.1:9",
    )
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    line = _one_line(_run([], env, tmp_path))
    assert "TASKSERVICE_TELEMETRY=gcp needs Google credentials" in line
    assert "TASKSERVICE_TELEMETRY=off" in line


@pytest.mark.parametrize("exporter", ["otlp", "gcp"])
def test_telemetry_without_the_extra_installed_says_what_to_do(
    tmp_path: Path, exporter: str
) -> None:
    """OpenTelemetry is an extra (taskservice[otlp], taskservice[gcp]); a
    server asked for telemetry without it says which to install. The
    interpreter is told opentelemetry is absent (sys.modules entry None, as
    the import system reads it), since the test's own environment has it."""
    absent = (
        "import sys; sys.modules['opentelemetry'] = None;"
        " from taskservice.__main__ import main; raise SystemExit(main([]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", absent],
        env=_env(PORT=str(free_port()), TASKSERVICE_TELEMETRY=exporter),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = _one_line(result)
    assert f"pip install 'taskservice[{exporter}]'" in line, line
    assert "TASKSERVICE_TELEMETRY=off" in line


async def test_flags_override_the_environment(
    launch: list[ServerProcess], tmp_path: Path, channel_to: list[grpc.aio.Channel]
) -> None:
    port = free_port()
    db = tmp_path / "flags" / "t.db"
    env = _env(PORT=str(free_port()), TASKSERVICE_STORE="firestore")
    p = _start(
        launch,
        {**env, "PORT": str(port)},
        tmp_path,
        ["--port", str(port), "--store", "sqlite", "--sqlite-path", str(db)],
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    channel_to.append(channel)
    await health_serving(health_pb2_grpc.HealthStub(channel))
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    await stub.CreateTask(create_request("by flags"), timeout=5)
    p.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(_exit_code, p, 10) == 0
    assert db.exists() and {"sqlite"} == {e["store"] for e in json_lines(p.output) if "store" in e}


@pytest.mark.firestore
async def test_firestore_is_chosen_by_the_environment(
    launch: list[ServerProcess],
    tmp_path: Path,
    emulator: Emulator,
    channel_to: list[grpc.aio.Channel],
) -> None:
    port = free_port()
    p = _start(
        launch,
        _env(
            PORT=str(port),
            FIRESTORE_EMULATOR_HOST=emulator.host,
            GOOGLE_CLOUD_PROJECT="demo-process",
        ),
        tmp_path,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    channel_to.append(channel)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    await health_serving(health_pb2_grpc.HealthStub(channel))
    task = await stub.CreateTask(create_request("in firestore"), timeout=5)
    assert await stub.GetTask(pb.GetTaskRequest(name=task.name), timeout=5) == task
    p.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(_exit_code, p, 10) == 0
    assert {"firestore"} == {e["store"] for e in json_lines(p.output) if "store" in e}
    assert not (tmp_path / "tasks.db").exists()


@pytest.mark.parametrize("access", ["on", "all", "off"])
async def test_log_level_governs_diagnostics_and_access_lines_have_their_own_switch(
    launch: list[ServerProcess],
    tmp_path: Path,
    channel_to: list[grpc.aio.Channel],
    access: str,
) -> None:
    """LOG_LEVEL=WARNING hides INFO diagnostics, not the access lines the
    log-based metrics, alerts and dashboard are built on:
    TASKSERVICE_ACCESS_LOG alone turns those off."""
    port = free_port()
    env = _env(PORT=str(port), LOG_LEVEL="warning", TASKSERVICE_ACCESS_LOG=access)
    p = _start(launch, env, tmp_path)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    channel_to.append(channel)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    await health_serving(health_pb2_grpc.HealthStub(channel))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetTask(pb.GetTaskRequest(name="tasks/missing"), timeout=5)
    p.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(_exit_code, p, 10) == 0
    assert "listening on" not in p.output  # an INFO diagnostic
    lines = json_lines(p.output)
    access_lines = [e for e in lines if e.get("logger") == "taskservice.access"]
    calls = [(e["grpc.method"], e["grpc.code"], e["fault"]) for e in access_lines]
    get = ("tasks.v1.TaskService/GetTask", "NOT_FOUND", "caller")
    if access == "off":
        assert calls == []
    elif access == "on":  # health checks (health_serving) are not logged
        assert calls == [get]
    else:
        assert calls[-1] == get and len(calls) >= 2
        assert set(calls[:-1]) == {("grpc.health.v1.Health/Check", "OK", "none")}


def _unshare_works() -> bool:
    probe = (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10, check=False)
        if shutil.which("unshare")
        else None
    )
    return probe is not None and probe.returncode == 0


@pytest.mark.parametrize("case", ["directory", "under-proc", "missing-parent-in-a-file"])
def test_an_unusable_sqlite_path_stops_the_server_at_once(tmp_path: Path, case: str) -> None:
    (tmp_path / "plain").write_text("not a directory")
    path, reason = {
        "directory": (str(tmp_path), "is a directory"),
        "under-proc": ("/proc/taskservice-test/tasks.db", "cannot be created on a proc"),
        "missing-parent-in-a-file": (str(tmp_path / "plain" / "tasks.db"), "is a file, not"),
    }[case]
    started = time.monotonic()
    line = _one_line(_run(["--sqlite-path", path], _env(PORT=str(free_port())), tmp_path))
    assert time.monotonic() - started < 10
    assert path in line and reason in line, line
    assert "--sqlite-path" in line


def test_a_sqlite_path_on_a_read_only_mount_stops_the_server_at_once(tmp_path: Path) -> None:
    """A read-only tmpfs, mounted in a private mount namespace of the run."""
    if not _unshare_works():
        loud_skip("READ-ONLY MOUNT TEST SKIPPED: unshare -rm is not permitted here")
    mount = tmp_path / "ro"
    mount.mkdir()
    path = mount / "tasks.db"
    script = (
        f"mount -t tmpfs -o ro tmpfs {mount} && exec {sys.executable} -m taskservice"
        f" --sqlite-path {path}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        env=_env(PORT=str(free_port())),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = _one_line(result)
    assert str(path) in line and "read-only file system" in line, line


async def test_an_unreachable_firestore_is_named_in_the_start_and_retry_lines(
    launch: list[ServerProcess], tmp_path: Path
) -> None:
    """Nothing listens at the emulator address: the server keeps trying, and
    its lines say where and for which project."""
    port, nowhere = free_port(), f"127.0.0.1:{free_port()}"
    p = _start(
        launch,
        _env(PORT=str(port), FIRESTORE_EMULATOR_HOST=nowhere, GOOGLE_CLOUD_PROJECT="demo-nowhere"),
        tmp_path,
    )
    deadline = time.monotonic() + 30
    while "store not ready" not in p.output and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    lines = json_lines(p.output)
    [start] = [e["message"] for e in lines if "listening on" in e["message"]]
    [retry, *_] = [e["message"] for e in lines if "store not ready" in e["message"]]
    for line in (start, retry):
        assert "project demo-nowhere" in line and "(default)" in line, line
        assert f"emulator {nowhere}" in line, line
