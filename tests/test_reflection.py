"""Server reflection as tools use it: grpcurl (v1alpha) and buf curl (v1 and
v1alpha), against a real server. Every symbol a tool can name resolves, and
the contract's comments come through."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taskservice.store.sqlite import SqliteStore
from tests.conftest import Running, start_server


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; pip install -e '.[dev]'")
    return found


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_server(SqliteStore(tmp_path / "t.db"))
    yield running
    await running.channel.close()
    await running.server.stop(grace=0)


async def run(*args: str) -> str:
    """Runs a tool in a thread: the server under test shares this event loop."""
    result = await asyncio.to_thread(
        subprocess.run, args, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result.stdout


SYMBOLS = [
    "tasks.v1.TaskService",
    "tasks.v1.TaskService.GetTask",
    "tasks.v1.TaskService.BatchCreateTasks",
    "tasks.v1.Task",
    "tasks.v1.Task.Priority",
    "tasks.v1.Task.State",
    "tasks.v1.Task.title",
    "tasks.v1.CreateTaskRequest",
    "grpc.health.v1.Health",
    "grpc.health.v1.Health.Check",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1.ServerReflection.ServerReflectionInfo",
]


async def test_grpcurl_lists_and_describes_every_symbol(served: Running) -> None:
    grpcurl = tool("grpcurl")
    services = (await run(grpcurl, "-plaintext", served.target, "list")).split()
    assert set(services) == {
        "tasks.v1.TaskService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    methods = (
        await run(grpcurl, "-plaintext", served.target, "list", "tasks.v1.TaskService")
    ).split()
    assert "tasks.v1.TaskService.WatchTasks" in methods or len(methods) == 6
    for symbol in SYMBOLS:
        await run(grpcurl, "-plaintext", served.target, "describe", symbol)
    described = await run(
        grpcurl, "-plaintext", served.target, "describe", "tasks.v1.TaskService.GetTask"
    )
    assert "Returns one task" in described  # the comment from the proto
    described = await run(grpcurl, "-plaintext", served.target, "describe", "tasks.v1.Task")
    assert "A short summary" in described


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_calls_through_each_reflection_protocol(
    served: Running, protocol: str
) -> None:
    buf = tool("buf")
    common = [
        buf,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        protocol,
    ]
    base = f"http://{served.target}"
    listed = await run(*common, "--list-methods", base)
    assert "tasks.v1.TaskService/GetTask" in listed.split()
    created = json.loads(
        await run(
            *common,
            "-d",
            '{"task": {"title": "through buf"}, "task_id": "buf-1"}',
            f"{base}/tasks.v1.TaskService/CreateTask",
        )
    )
    assert created["name"] == "tasks/buf-1"
    got = json.loads(
        await run(*common, "-d", '{"name": "tasks/buf-1"}', f"{base}/tasks.v1.TaskService/GetTask")
    )
    assert got == created
    health = json.loads(await run(*common, f"{base}/grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"
