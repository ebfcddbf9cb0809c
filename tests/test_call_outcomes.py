"""What the access line, the metrics and the span say a call ended with, for
the endings gRPC decides rather than a handler: a deadline that passed, a
caller's cancel, a request over the size limit, a method the server does not
have. Real server, real channel, a real OTLP receiver; the store is a real
SQLite store whose get can be made to hang (as a frozen Firestore would).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tasks.v1 import task_service_pb2 as pb

from harness import Running, start_server
from harness.otlp import Receiver
from taskservice.domain.limits import MAX_REQUEST_BYTES, MAX_TRANSPORT_MESSAGE_BYTES
from taskservice.domain.model import Task
from taskservice.store.sqlite import SqliteStore
from tests.h2client import unary_call
from tests.helpers import create_request, eventually, expect_error
from tests.test_telemetry import flush, telemetry_config

GET = "tasks.v1.TaskService/GetTask"
BATCH = "tasks.v1.TaskService/BatchCreateTasks"


class HangingGetStore(SqliteStore):
    """A real SQLite store whose get of `tasks/hang` never answers."""

    async def get(self, task_id: str, timeout: float) -> Task:
        if task_id == "hang":
            await asyncio.Event().wait()
        return await super().get(task_id, timeout)


@pytest.fixture
async def server(receiver: Receiver, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_server(
        HangingGetStore(tmp_path / "t.db"),
        telemetry_config(receiver.endpoint, stream_idle_seconds=1.0),
    )
    yield running
    await running.close()


def _access(captured: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in captured.getvalue().splitlines() if line.strip()]
    return [e for e in lines if e.get("logger") == "taskservice.access"]


async def _access_lines(captured: io.StringIO, n: int) -> list[dict[str, Any]]:
    """The first n access lines (a cancelled call's is written as its
    handler unwinds, just after the caller has its status)."""
    await eventually(lambda: len(_access(captured)) >= n)
    return _access(captured)


async def _durations(receiver: Receiver, running: Running, wanted: set[tuple[str, ...]]) -> Any:
    """grpc.server.call.duration points keyed by (method, status, fault)."""
    await flush(running)

    def found() -> dict[tuple[str, ...], Any]:
        points = {}
        for key, point in receiver.latest("grpc.server.call.duration").items():
            attrs = dict(key)
            points[
                (attrs["grpc.method"], attrs["grpc.status"], attrs.get("taskservice.fault", ""))
            ] = point
        return points

    return await receiver.wait_for(lambda: wanted <= found().keys() and found())


async def test_a_passed_deadline_is_deadline_exceeded_and_a_cancel_cancelled(
    server: Running, receiver: Receiver, captured: io.StringIO
) -> None:
    """grpc.aio cancels the handler in both cases; only the deadline tells."""
    hang = pb.GetTaskRequest(name="tasks/hang")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.GetTask(hang, timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = server.stub.GetTask(hang, timeout=30)
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    deadline, cancelled = await _access_lines(captured, 2)
    assert (deadline["grpc.method"], deadline["grpc.code"]) == (GET, "DEADLINE_EXCEEDED")
    assert deadline["fault"] == "server" and deadline["reason"] == "DEADLINE_PASSED"
    assert 250 < deadline["latency_ms"] < 2000
    assert (cancelled["grpc.method"], cancelled["grpc.code"]) == (GET, "CANCELLED")
    assert cancelled["fault"] == "caller"
    points = await _durations(
        receiver, server, {(GET, "DEADLINE_EXCEEDED", "server"), (GET, "CANCELLED", "caller")}
    )
    assert points[(GET, "DEADLINE_EXCEEDED", "server")].count == 1
    assert points[(GET, "CANCELLED", "caller")].count == 1
    spans = await receiver.wait_for(lambda: [s for s in receiver.spans() if s.name == GET])
    by_code = {_attr(s, "rpc.response.status_code"): s for s in spans}
    assert (
        by_code["DEADLINE_EXCEEDED"].status.code
        == by_code["DEADLINE_EXCEEDED"].status.STATUS_CODE_ERROR
    )
    assert by_code["CANCELLED"].status.code == by_code["CANCELLED"].status.STATUS_CODE_UNSET


async def test_a_refusal_at_capacity_is_the_servers_doing(
    receiver: Receiver, tmp_path: Path, captured: io.StringIO
) -> None:
    running = await start_server(
        HangingGetStore(tmp_path / "t.db"),
        telemetry_config(receiver.endpoint, max_concurrent_rpcs=1),
    )
    try:
        hanging = asyncio.ensure_future(
            running.stub.GetTask(pb.GetTaskRequest(name="tasks/hang"), timeout=30)
        )
        await asyncio.sleep(0.2)
        details = await expect_error(
            running.stub.GetTask(pb.GetTaskRequest(name="tasks/x")),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert details.reason == "TOO_MANY_CALLS"
        [line] = await _access_lines(captured, 1)
        assert (line["grpc.code"], line["reason"], line["fault"]) == (
            "RESOURCE_EXHAUSTED",
            "TOO_MANY_CALLS",
            "server",
        )
        hanging.cancel()
    finally:
        await running.close()


async def test_an_unknown_method_from_a_raw_http2_client_is_logged(
    server: Running, captured: io.StringIO
) -> None:
    """No gRPC library on the calling side: the h2 package."""
    answer = await asyncio.to_thread(
        unary_call, "127.0.0.1", server.server.port, "/nope.v1.Nope/Nothing", b""
    )
    assert answer[":status"] == "200" and answer["grpc-status"] == "12", answer
    [line] = await _access_lines(captured, 1)
    assert (line["grpc.method"], line["grpc.code"], line["requested_method"]) == (
        "other",
        "UNIMPLEMENTED",
        "/nope.v1.Nope/Nothing",
    )


def _attr(span: Any, key: str) -> Any:
    return next((a.value.string_value for a in span.attributes if a.key == key), None)


async def test_a_slow_callers_stream_is_its_own_fault(
    server: Running, receiver: Receiver, captured: io.StringIO
) -> None:
    """A BatchCreateTasks stream the caller lets go idle: past the server's
    idle limit (STREAM_IDLE), or past the caller's own deadline while the
    server waits for its next message (CALLER_TOO_SLOW). Both are
    DEADLINE_EXCEEDED, and neither is the server's doing."""

    async def then_silence(seconds: float) -> AsyncIterator[pb.CreateTaskRequest]:
        yield create_request("first")
        await asyncio.sleep(seconds)

    with pytest.raises(grpc.aio.AioRpcError) as idle:
        await server.stub.BatchCreateTasks(then_silence(5), timeout=30)
    assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await server.stub.BatchCreateTasks(then_silence(5), timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    first, second = await _access_lines(captured, 2)
    assert (first["grpc.method"], first["grpc.code"], first["reason"], first["fault"]) == (
        BATCH,
        "DEADLINE_EXCEEDED",
        "STREAM_IDLE",
        "caller",
    )
    assert (second["grpc.code"], second["reason"], second["fault"]) == (
        "DEADLINE_EXCEEDED",
        "CALLER_TOO_SLOW",
        "caller",
    )
    points = await _durations(receiver, server, {(BATCH, "DEADLINE_EXCEEDED", "caller")})
    assert points[(BATCH, "DEADLINE_EXCEEDED", "caller")].count == 2
    assert (BATCH, "DEADLINE_EXCEEDED", "server") not in points
    # Neither stream ended, so neither batch was written: gRPC ends the
    # server's request iterator when the deadline passes, as if the stream
    # were complete, and the half-read batch must not be taken for one.
    listed = await server.stub.ListTasks(pb.ListTasksRequest(page_size=10))
    assert list(listed.tasks) == []


async def test_a_watch_its_caller_ends_with_a_deadline_is_not_a_server_error(
    server: Running, captured: io.StringIO
) -> None:
    """How long to listen is the caller's choice."""
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for _ in server.stub.WatchTasks(pb.WatchTasksRequest(), timeout=0.5):
            pass
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [line] = await _access_lines(captured, 1)
    assert (line["grpc.method"], line["grpc.code"], line["reason"], line["fault"]) == (
        "tasks.v1.TaskService/WatchTasks",
        "DEADLINE_EXCEEDED",
        "STREAM_DEADLINE",
        "caller",
    )


async def test_calls_grpc_would_refuse_unseen_are_logged_and_counted(
    server: Running, receiver: Receiver, captured: io.StringIO
) -> None:
    """A request over 64 KiB (unary and in a stream) and an unknown method."""
    big = create_request("big", description="x" * MAX_REQUEST_BYTES)
    details = await expect_error(server.stub.CreateTask(big), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert details.reason == "REQUEST_TOO_LARGE"
    assert details.metadata["limit_bytes"] == str(MAX_REQUEST_BYTES)
    assert int(details.metadata["size_bytes"]) == big.ByteSize()

    async def one_big() -> AsyncIterator[pb.CreateTaskRequest]:
        yield create_request("small")
        yield big

    details = await expect_error(
        server.stub.BatchCreateTasks(one_big()), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert details.reason == "REQUEST_TOO_LARGE" and "requests[1]" in details.message
    unknown = server.channel.unary_unary("/tasks.v1.TaskService/NoSuchMethod")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unknown(b"\x0a\x03abc", metadata=_sampled())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    create, batch, other = await _access_lines(captured, 3)
    assert (create["grpc.method"], create["grpc.code"], create["reason"]) == (
        "tasks.v1.TaskService/CreateTask",
        "RESOURCE_EXHAUSTED",
        "REQUEST_TOO_LARGE",
    )
    assert create["request_bytes"] == big.ByteSize() and create["fault"] == "caller"
    assert (batch["grpc.method"], batch["grpc.code"]) == (BATCH, "RESOURCE_EXHAUSTED")
    # An unknown method is `other` (gRFC A66), as in the metrics; what was
    # asked for is kept apart, so that no caller can multiply label values.
    assert (other["grpc.method"], other["grpc.code"]) == ("other", "UNIMPLEMENTED")
    assert other["requested_method"] == "/tasks.v1.TaskService/NoSuchMethod"
    points = await _durations(
        receiver,
        server,
        {
            ("tasks.v1.TaskService/CreateTask", "RESOURCE_EXHAUSTED", "caller"),
            (BATCH, "RESOURCE_EXHAUSTED", "caller"),
            ("other", "UNIMPLEMENTED", "server"),
        },
    )
    assert points[("other", "UNIMPLEMENTED", "server")].count == 1
    [span] = await receiver.wait_for(lambda: [s for s in receiver.spans() if s.name == "other"])
    assert _attr(span, "rpc.method") == "_OTHER"  # OpenTelemetry's RPC conventions
    assert _attr(span, "rpc.method_original") == "/tasks.v1.TaskService/NoSuchMethod"
    assert span.status.code == span.status.STATUS_CODE_ERROR  # UNIMPLEMENTED: the server's
    # Beyond the transport limit gRPC refuses a message itself (the bound on
    # what one call can make the server buffer).
    huge = create_request("huge", description="x" * MAX_TRANSPORT_MESSAGE_BYTES)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.stub.CreateTask(huge)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_method_has_one_name_in_logs_metrics_and_spans(
    server: Running, receiver: Receiver, captured: io.StringIO
) -> None:
    await expect_error(
        server.stub.GetTask(pb.GetTaskRequest(name="tasks/none"), metadata=_sampled()),
        grpc.StatusCode.NOT_FOUND,
    )
    [line] = await _access_lines(captured, 1)
    points = await _durations(receiver, server, {(GET, "NOT_FOUND", "caller")})
    assert line["grpc.method"] == GET and (GET, "NOT_FOUND", "caller") in points
    [span] = await receiver.wait_for(lambda: [s for s in receiver.spans() if s.name == GET])
    assert _attr(span, "rpc.method") == GET and _attr(span, "rpc.system.name") == "grpc"
    assert _attr(span, "rpc.response.status_code") == "NOT_FOUND"
    # NOT_FOUND is the caller's answer, not a server error (OpenTelemetry's
    # gRPC conventions): the span's status stays unset.
    assert span.status.code == span.status.STATUS_CODE_UNSET
    assert "rpc.grpc.status_code" not in {a.key for a in span.attributes}


def _sampled() -> tuple[tuple[str, str], ...]:
    return (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)
