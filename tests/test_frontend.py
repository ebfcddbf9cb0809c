"""TaskService behind a stand-in for Cloud Run's front end: Debian nginx
terminating TLS + HTTP/2 and speaking h2c to the server (grpc_pass)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import free_port
from harness.frontend import NginxFrontEnd, nginx_binary
from taskservice.client import open_channel
from taskservice.config import Config
from taskservice.runtime.server import TaskServer
from taskservice.store.sqlite import SqliteStore
from tests.helpers import create_request, stream_of

pytestmark = pytest.mark.slow


@pytest.fixture
def upstream_port() -> int:
    return free_port()


@pytest.fixture
def front_end(tmp_path: Path, upstream_port: int) -> Iterator[NginxFrontEnd]:
    if nginx_binary() is None:
        pytest.skip("FRONT-END TEST SKIPPED: nginx is not installed (apt-get install nginx)")
    front = NginxFrontEnd([upstream_port], tmp_path, tls=True)
    yield front
    front.stop()


@pytest.fixture
async def upstream(tmp_path: Path, upstream_port: int) -> AsyncIterator[TaskServer]:
    config = Config(host="127.0.0.1", port=upstream_port, grace_seconds=1.0)
    server = TaskServer(config, SqliteStore(tmp_path / "tasks.db"))
    await server.start()
    yield server
    await server.stop(grace=0)


async def test_calls_through_tls_front_end(front_end: NginxFrontEnd, upstream: TaskServer) -> None:
    channel = open_channel(
        f"https://localhost:{front_end.port}", root_certificates=front_end.certificate
    )
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    try:
        task = await stub.CreateTask(create_request("through nginx", task_id="via-nginx"))
        assert await stub.GetTask(pb.GetTaskRequest(name=task.name)) == task
        updated = await stub.UpdateTask(
            pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="updated", etag=task.etag))
        )
        assert updated.title == "updated"

        requests = [create_request(f"batch {i}", description="x" * 1500) for i in range(500)]
        assert sum(r.ByteSize() for r in requests) > 750_000
        response = await stub.BatchCreateTasks(stream_of(requests), timeout=60)
        assert [t.title for t in response.tasks] == [f"batch {i}" for i in range(500)]
        page = await stub.ListTasks(pb.ListTasksRequest(page_size=200))
        assert len(page.tasks) == 200 and page.next_page_token

        await stub.DeleteTask(pb.DeleteTaskRequest(name=task.name, etag=updated.etag))

        # Upstream gone: the client gets UNAVAILABLE from the front end, fast.
        await upstream.stop(grace=0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(stub.ListTasks(pb.ListTasksRequest(), timeout=5), 10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
