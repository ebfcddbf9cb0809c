"""Health reflects readiness: NOT_SERVING until the store answers, SERVING
after, NOT_SERVING from the moment shutdown starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc_health.v1 import health_pb2

from harness import start_server
from taskservice.store.sqlite import SqliteStore

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_watchers_see_not_serving_as_soon_as_shutdown_starts(tmp_path: Path) -> None:
    running = await start_server(SqliteStore(tmp_path / "t.db"))
    try:
        for service in ("", "tasks.v1.TaskService"):
            response = await running.health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == SERVING
        watch = running.health.Watch(health_pb2.HealthCheckRequest(service="tasks.v1.TaskService"))
        assert (await watch.read()).status == SERVING
        stopping = asyncio.ensure_future(running.server.stop(grace=2))
        update = await asyncio.wait_for(watch.read(), 1.5)
        assert update.status == NOT_SERVING
        await stopping
    finally:
        await running.channel.close()
