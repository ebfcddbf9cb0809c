"""Shutdown with long-lived streams open: health Watch and reflection streams
are ended when the drain starts, so they cannot hold the process until Cloud
Run's SIGKILL. And calls that reached the server before the shutdown run,
rather than end CANCELLED unrun."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import ServerProcess, free_port, health_serving
from taskservice.config import Config
from taskservice.runtime.server import TaskServer
from taskservice.store.sqlite import SqliteStore
from tests.reliability import record


async def test_open_watch_and_reflection_streams_do_not_hold_the_drain(tmp_path: Path) -> None:
    server = ServerProcess({"TASKSERVICE_SQLITE_PATH": str(tmp_path / "t.db")}, tmp_path)
    channel = grpc.aio.insecure_channel(server.target)
    # None ends the request stream: left waiting on the queue, grpc.aio's
    # task that reads it would be collected pending, and asyncio would log
    # it as an ERROR in whichever later test the collection falls.
    ask = asyncio.Queue[reflection_pb2.ServerReflectionRequest | None]()
    try:
        health = health_pb2_grpc.HealthStub(channel)
        await health_serving(health)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
        for watch in watches:
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            while (request := await ask.get()) is not None:
                yield request

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            requests()
        )
        await ask.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert (await reflection.read()).HasField("list_services_response")

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        statuses = [(await watch.read()).status for watch in watches]
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING] * 3
        code, _ = await asyncio.to_thread(server.stop, 15)
        exited = time.monotonic() - started
        record(
            "drain_with_open_streams",
            watch_streams=3,
            reflection_streams=1,
            exit_s=round(exited, 2),
            exit_code=code,
        )
        assert code == 0
        assert exited < 1.5
        for watch in watches:
            try:
                await watch.read()
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ask.put_nowait(None)
        server.kill()
        await channel.close()


async def test_calls_that_arrived_before_the_shutdown_are_run(tmp_path: Path) -> None:
    """grpc core cancels the calls that have reached the server but that
    grpc.aio has not yet picked up when shutdown starts (grpc/grpc#41785): the
    caller gets CANCELLED for a call that never ran. A busy event loop leaves
    such a backlog; here the server's loop is blocked while 20 calls arrive,
    then the server is stopped. Before TaskServer let the backlog in first,
    19 of the 20 ended CANCELLED."""
    port = free_port()
    server = TaskServer(
        Config(host="127.0.0.1", port=port, grace_seconds=2), SqliteStore(tmp_path / "t.db")
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        await stub.ListTasks(pb.ListTasksRequest(), timeout=5)  # connected
        calls = [
            asyncio.ensure_future(stub.GetTask(pb.GetTaskRequest(name="tasks/x"), timeout=5))
            for _ in range(20)
        ]
        for _ in range(3):
            await asyncio.sleep(0)  # the calls are sent
        time.sleep(0.3)  # a busy loop: they arrive, none is picked up
        await server.stop()
        codes = []
        for call in calls:
            try:
                await call
                codes.append("OK")
            except grpc.aio.AioRpcError as err:
                codes.append(err.code().name)
    record("drain_backlog", calls=len(codes), codes=dict(Counter(codes)))
    assert codes == ["NOT_FOUND"] * 20  # every call ran (there is no tasks/x)
