"""taskservice.client against a real server that goes away and comes back."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import pytest
from tasks.v1 import task_service_pb2 as pb

from harness import free_port
from taskservice import client as client_module
from taskservice.client import connect, parse_target
from taskservice.config import Config
from taskservice.server import TaskServer
from taskservice.store.sqlite import SqliteStore
from tests.helpers import create_request


@pytest.mark.parametrize(
    ("target", "address", "secure", "audience"),
    [
        ("localhost:8080", "localhost:8080", False, None),
        ("127.0.0.1:50051", "127.0.0.1:50051", False, None),
        ("[::1]:9000", "[::1]:9000", False, None),
        ("localhost", "localhost:8080", False, None),
        (
            "tasks-abc-uc.a.run.app",
            "tasks-abc-uc.a.run.app:443",
            True,
            "https://tasks-abc-uc.a.run.app",
        ),
        (
            "https://tasks-abc-uc.a.run.app",
            "tasks-abc-uc.a.run.app:443",
            True,
            "https://tasks-abc-uc.a.run.app",
        ),
        ("tasks.example.com:8443", "tasks.example.com:8443", True, None),
        (
            "ipv4:127.0.0.1:8081,127.0.0.1:8082",
            "ipv4:127.0.0.1:8081,127.0.0.1:8082",
            False,
            None,
        ),
        ("ipv4:10.0.0.1:443,10.0.0.2:443", "ipv4:10.0.0.1:443,10.0.0.2:443", True, None),
    ],
)
def test_parse_target(target: str, address: str, secure: bool, audience: str | None) -> None:
    parsed = parse_target(target)
    assert (parsed.address, parsed.secure, parsed.audience) == (address, secure, audience)


async def _serve(port: int, db: Path) -> TaskServer:
    server = TaskServer(Config(host="127.0.0.1", port=port, grace_seconds=0.5), SqliteStore(db))
    await server.start()
    return server


async def test_retries_reach_a_restarted_server(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "t.db"
    server = await _serve(port, db)
    async with connect(f"127.0.0.1:{port}") as client:
        task = await client.stub.CreateTask(create_request("t"))
        await server.stop(grace=0)

        # Not idempotent: fails at once, is not retried, creates nothing.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.stub.CreateTask(create_request("no request id"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        async def restart_soon() -> TaskServer:
            await asyncio.sleep(0.1)
            return await _serve(port, db)

        restarting = asyncio.ensure_future(restart_soon())
        started = time.monotonic()
        got = await client.stub.GetTask(pb.GetTaskRequest(name=task.name), timeout=10)
        assert got == task
        assert time.monotonic() - started >= 0.05  # it really waited for the restart
        server = await restarting
        await server.stop(grace=0)

        # Idempotent create (request_id) retries through the next outage.
        restarting = asyncio.ensure_future(restart_soon())
        request_id = str(uuid.uuid4())
        created = await client.stub.CreateTask(
            create_request("r", request_id=request_id), timeout=10
        )
        server = await restarting
        listed = await client.stub.ListTasks(pb.ListTasksRequest())
        assert sorted(t.name for t in listed.tasks) == sorted([task.name, created.name])

        # Delete with an etag retries too; without one it does not.
        await server.stop(grace=0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.stub.DeleteTask(pb.DeleteTaskRequest(name=created.name))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        restarting = asyncio.ensure_future(restart_soon())
        await client.stub.DeleteTask(
            pb.DeleteTaskRequest(name=created.name, etag=created.etag), timeout=10
        )
        server = await restarting
        await server.stop(grace=0)


async def test_default_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    monkeypatch.setattr(client_module, "DEFAULT_TIMEOUT", 0.5)
    try:
        async with connect(f"127.0.0.1:{port}") as client:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.stub.GetTask(pb.GetTaskRequest(name="tasks/x"))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2
    finally:
        for w in held:
            w.close()
        silent.close()
