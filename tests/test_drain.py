"""Shutdown with long-lived streams open: health Watch and reflection streams
are ended when the drain starts, so they cannot hold the process until Cloud
Run's SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness import ServerProcess, wait_serving
from tests.reliability import record


async def test_open_watch_and_reflection_streams_do_not_hold_the_drain(tmp_path: Path) -> None:
    server = ServerProcess({"TASKSERVICE_SQLITE_PATH": str(tmp_path / "t.db")}, tmp_path)
    channel = grpc.aio.insecure_channel(server.target)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        await wait_serving(health)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
        for watch in watches:
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        ask = asyncio.Queue[reflection_pb2.ServerReflectionRequest]()

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            while True:
                yield await ask.get()

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
        server.kill()
        await channel.close()
