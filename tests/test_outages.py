"""A store that is down or silent gives fast, honest errors: UNAVAILABLE or
DEADLINE_EXCEEDED within the caller's deadline, never a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from tasks.v1 import task_service_pb2 as pb

from harness import (
    Running,
    emulator_jar,
    free_port,
    health_serving,
    launch_emulator,
    start_server,
    wait_for_port,
)
from taskservice.config import Config
from taskservice.store.firestore import FirestoreStore
from tests.helpers import create_request, expect_error, stream_of


async def _server_over(target: str) -> Running:
    store = FirestoreStore(grpc.aio.insecure_channel(target), project="demo-outage")
    config = Config(host="127.0.0.1", port=0, grace_seconds=1.0)
    return await start_server(store, config, ready=False)


@pytest.fixture
async def black_hole() -> AsyncIterator[str]:
    """A TCP peer that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}"
    for w in held:
        w.close()
    server.close()


async def test_store_down_gives_unavailable_fast_and_not_serving() -> None:
    running = await _server_over(f"127.0.0.1:{free_port()}")
    try:
        health = await running.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        for call in (
            running.stub.GetTask(pb.GetTaskRequest(name="tasks/x"), timeout=10),
            running.stub.CreateTask(create_request("t"), timeout=10),
            running.stub.ListTasks(pb.ListTasksRequest(), timeout=10),
            running.stub.DeleteTask(pb.DeleteTaskRequest(name="tasks/x"), timeout=10),
            running.stub.BatchCreateTasks(stream_of([create_request("t")]), timeout=10),
        ):
            started = time.monotonic()
            details = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
            assert time.monotonic() - started < 3
            assert details.reason == "STORE_UNAVAILABLE"
            assert "127.0.0.1" not in details.message  # no internal text
    finally:
        await running.channel.close()
        await running.server.stop(grace=0)


async def test_silent_store_answers_within_the_callers_deadline(black_hole: str) -> None:
    running = await _server_over(black_hole)
    try:
        for call in (
            running.stub.GetTask(pb.GetTaskRequest(name="tasks/x"), timeout=1.0),
            running.stub.CreateTask(create_request("t"), timeout=1.0),
            running.stub.UpdateTask(
                pb.UpdateTaskRequest(task=pb.Task(name="tasks/x", title="y")), timeout=1.0
            ),
            running.stub.ListTasks(pb.ListTasksRequest(), timeout=1.0),
        ):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            elapsed = time.monotonic() - started
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert elapsed < 1.5, elapsed
    finally:
        await running.channel.close()
        await running.server.stop(grace=0)


async def test_store_that_appears_later_turns_health_serving() -> None:
    jar = emulator_jar()
    if jar is None:
        pytest.skip("FIRESTORE TESTS SKIPPED: the Cloud Firestore emulator is not installed")
    port = free_port()
    running = await _server_over(f"127.0.0.1:{port}")
    try:
        await asyncio.sleep(0.5)
        health = await running.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        process = launch_emulator(jar, port)
        try:
            assert await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 60)
            await health_serving(running.health, timeout=30)
        finally:
            process.terminate()
            process.wait(10)
    finally:
        await running.channel.close()
        await running.server.stop(grace=0)


async def test_without_a_client_deadline_the_server_cap_still_answers(
    black_hole: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskservice.api import calls

    monkeypatch.setattr(calls, "MAX_STORE_CALL_SECONDS", 1.0)  # 30 s in production
    running = await _server_over(black_hole)
    try:
        started = time.monotonic()
        details = await expect_error(
            running.stub.GetTask(pb.GetTaskRequest(name="tasks/x")),  # no deadline
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        assert time.monotonic() - started < 2
        assert details.reason == "DEADLINE_EXCEEDED"
    finally:
        await running.channel.close()
        await running.server.stop(grace=0)
