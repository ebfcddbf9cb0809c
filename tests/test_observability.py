"""Access logs, traces and unhandled errors, seen through the real server's log output."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from tasks.v1 import task_service_pb2 as pb

from harness import Running, start_server
from taskservice.domain.model import Task
from taskservice.observe import jsonlog, tracing
from taskservice.store.sqlite import SqliteStore
from tests.helpers import create_request, expect_error, stream_of


class BrokenStore(SqliteStore):
    """A real SQLite store whose get fails the way a bug would."""

    async def get(self, task_id: str, timeout: float) -> Task:
        raise RuntimeError("secret internal detail /var/lib/thing")


@pytest.fixture
async def broken(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_server(BrokenStore(tmp_path / "t.db"))
    yield running
    await running.channel.close()
    await running.server.stop(grace=0)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_one_access_line_per_rpc_with_trace(broken: Running, captured: io.StringIO) -> None:
    trace_id = uuid.uuid4().hex
    metadata = (
        ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),
        ("authorization", "Bearer SECRET-TOKEN"),
    )
    task = await broken.stub.CreateTask(create_request("TOPSECRET-TITLE"), metadata=metadata)
    await expect_error(
        broken.stub.DeleteTask(pb.DeleteTaskRequest(name="tasks/nope")), grpc.StatusCode.NOT_FOUND
    )
    cloud = (("x-cloud-trace-context", f"{trace_id.upper()}/123;o=1"),)
    await broken.stub.BatchCreateTasks(
        stream_of([create_request(f"t{i}") for i in range(3)]), metadata=cloud
    )
    access = [e for e in _lines(captured) if e["logger"] == "taskservice.access"]
    assert [e["grpc.method"] for e in access] == [
        "tasks.v1.TaskService/CreateTask",
        "tasks.v1.TaskService/DeleteTask",
        "tasks.v1.TaskService/BatchCreateTasks",
    ]
    create, delete, batch = access
    assert create["grpc.code"] == "OK" and create["severity"] == "INFO"
    assert create["logging.googleapis.com/trace"] == f"projects/demo-proj/traces/{trace_id}"
    assert create["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert create["logging.googleapis.com/trace_sampled"] is True
    assert create["request_bytes"] > 0 and create["response_bytes"] == task.ByteSize()
    assert isinstance(create["latency_ms"], float) and create["latency_ms"] > 0
    assert "127.0.0.1" in str(create["peer"])
    assert delete["grpc.code"] == "NOT_FOUND" and "logging.googleapis.com/trace" not in delete
    assert batch["request_messages"] == 3 and batch["grpc.code"] == "OK"
    assert batch["logging.googleapis.com/trace"] == f"projects/demo-proj/traces/{trace_id}"
    assert batch["logging.googleapis.com/spanId"] == format(123, "016x")
    text = captured.getvalue()
    assert "TOPSECRET" not in text and "SECRET-TOKEN" not in text


async def test_unhandled_error_is_internal_with_an_error_id(
    broken: Running, captured: io.StringIO
) -> None:
    details = await expect_error(
        broken.stub.GetTask(pb.GetTaskRequest(name="tasks/x")), grpc.StatusCode.INTERNAL
    )
    assert "secret" not in details.message and "/var/lib" not in details.message
    error_id = details.message.split("error_id=")[1].rstrip(")")
    logged = [e for e in _lines(captured) if e.get("error_id") == error_id]
    assert len(logged) == 1
    assert logged[0]["severity"] == "ERROR"
    assert "Traceback" in str(logged[0]["message"])
    assert "secret internal detail" in str(logged[0]["message"])
    access = [e for e in _lines(captured) if e["logger"] == "taskservice.access"]
    assert access[-1]["grpc.code"] == "INTERNAL" and access[-1]["severity"] == "ERROR"


def test_access_short_cut_writes_the_line_the_logging_chain_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """log_fields skips LogRecords only when configure()'s handler is the sole
    one: the line must be the same as through the chain, and any other handler
    (a test's, an operator's) still gets the record."""
    short, chain = io.StringIO(), io.StringIO()
    handler = jsonlog.JsonLinesHandler(short)
    handler.setFormatter(jsonlog.JsonFormatter())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(jsonlog, "_handler", handler)
    logger = logging.getLogger("taskservice.access")
    fields = {"grpc.method": "/x/Y", "grpc.code": "OK", "latency_ms": 1.5, "peer": 'a"b'}
    token = tracing.current_trace.set(tracing.CallTrace("ab" * 16, "cd" * 8, True))
    try:
        jsonlog.log_fields(logger, logging.INFO, "/x/Y OK", fields)
        jsonlog.log_fields(logger, logging.DEBUG, "below the level", fields)
        other = logging.StreamHandler(chain)
        other.setFormatter(jsonlog.JsonFormatter())
        monkeypatch.setattr(root, "handlers", [handler, other])
        jsonlog.log_fields(logger, logging.INFO, "/x/Y OK", fields)
    finally:
        tracing.current_trace.reset(token)
    first, second = (json.loads(line) for line in short.getvalue().splitlines())
    [through_chain] = _lines(chain)
    for entry in (first, second, through_chain):
        del entry["time"]
    assert first == second == through_chain
    assert first["peer"] == 'a"b' and first["trace_id"] == "ab" * 16
    assert first["severity"] == "INFO" and first["logger"] == "taskservice.access"
