"""Server reflection as tools use it: grpcurl (v1alpha) and buf curl (v1 and
v1alpha), against a real server. Every symbol a tool can name resolves, and
the contract's comments come through."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from harness import Running, start_server
from taskservice.store.sqlite import SqliteStore


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


async def _every_rpc(call: Any, prefix: str) -> None:
    """Each TaskService RPC once, through a tool: call(method, body) -> JSON."""
    created = await call("CreateTask", json.dumps({"task": {"title": "t"}, "task_id": prefix}))
    assert created["name"] == f"tasks/{prefix}"
    assert await call("GetTask", json.dumps({"name": created["name"]})) == created
    updated = await call(
        "UpdateTask",
        json.dumps({"task": {"name": created["name"], "title": "u", "etag": created["etag"]}}),
    )
    assert updated["title"] == "u"
    batch = await call(
        "BatchCreateTasks",
        "\n".join(json.dumps({"task": {"title": f"b{i}", "tags": [prefix]}}) for i in range(3)),
    )
    assert [t["title"] for t in batch["tasks"]] == ["b0", "b1", "b2"]
    listed = await call("ListTasks", json.dumps({"filter": f'tags:"{prefix}"'}))
    assert len(listed["tasks"]) == 3
    assert await call("DeleteTask", json.dumps({"name": created["name"]})) == {}


async def test_grpcurl_calls_every_rpc(served: Running) -> None:
    grpcurl = tool("grpcurl")

    async def call(method: str, body: str) -> Any:
        return json.loads(
            await run(
                grpcurl,
                "-plaintext",
                "-d",
                body,
                served.target,
                f"tasks.v1.TaskService/{method}",
            )
            or "{}"
        )

    await _every_rpc(call, "grpcurl-1")


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_lists_and_calls_every_rpc_through_each_reflection_protocol(
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
    listed = (await run(*common, "--list-methods", base)).split()
    assert "tasks.v1.TaskService/GetTask" in listed
    assert "grpc.health.v1.Health/Check" in listed
    # Calling a method makes buf resolve its file by symbol, over `protocol`.
    resolved = await asyncio.to_thread(
        subprocess.run,
        [*common, "-v", "-d", '{"name": "tasks/none"}', f"{base}/tasks.v1.TaskService/GetTask"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 'resolved file "tasks/v1/task_service.proto"' in resolved.stderr
    assert "NotFound" in resolved.stderr or "not_found" in resolved.stdout + resolved.stderr

    async def call(method: str, body: str) -> Any:
        return json.loads(
            await run(*common, "-d", body, f"{base}/tasks.v1.TaskService/{method}") or "{}"
        )

    await _every_rpc(call, f"buf-{protocol.removeprefix('grpc-')}")
    health = json.loads(await run(*common, f"{base}/grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"


@pytest.mark.parametrize("service", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
async def test_a_method_symbol_resolves_with_its_comments(served: Running, service: str) -> None:
    """The v1 and v1alpha messages are the same on the wire: one client for both."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    call = served.channel.stream_stream(
        f"/{service}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        for symbol in ("tasks.v1.TaskService.GetTask", "tasks.v1.Task.PRIORITY_HIGH", "nope.X")
    ]
    responses = [r async for r in call(iter(requests))]
    first = descriptor_pb2.FileDescriptorProto.FromString(
        responses[0].file_descriptor_response.file_descriptor_proto[0]
    )
    assert first.name == "tasks/v1/task_service.proto"
    comments = [loc.leading_comments for loc in first.source_code_info.location]
    assert any("Returns one task" in c for c in comments)
    names = {
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in responses[0].file_descriptor_response.file_descriptor_proto
    }
    assert "google/protobuf/timestamp.proto" in names  # sent with its dependencies
    assert responses[1].HasField("file_descriptor_response")
    assert responses[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_grpcurl_prints_error_details_decoded(served: Running) -> None:
    """ErrorInfo and BadRequest resolve through reflection, so grpcurl shows
    their fields rather than "google.rpc.ErrorInfo is not recognized"."""
    grpcurl = tool("grpcurl")
    described = await run(grpcurl, "-plaintext", served.target, "describe", "google.rpc.ErrorInfo")
    assert "message ErrorInfo" in described
    await run(grpcurl, "-plaintext", served.target, "describe", "google.rpc.BadRequest")
    failed = await asyncio.to_thread(
        subprocess.run,
        [
            grpcurl,
            "-plaintext",
            "-d",
            '{"task": {"title": ""}}',
            served.target,
            "tasks.v1.TaskService/CreateTask",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0], failed.stderr
    assert "not recognized" not in failed.stderr, failed.stderr
    details = [
        json.loads(line.split(")", 1)[1])
        for line in failed.stderr.splitlines()
        if line.strip()[:2] in ("1)", "2)")
    ]
    by_type = {d["@type"].rsplit("/", 1)[1]: d for d in details}
    assert by_type["google.rpc.ErrorInfo"]["reason"] == "INVALID_ARGUMENT"
    assert by_type["google.rpc.ErrorInfo"]["domain"] == "taskservice"
    violations = by_type["google.rpc.BadRequest"]["field_violations"]
    assert [v["field"] for v in violations] == ["task.title"]


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_error_details_decode_with_the_served_schema(
    served: Running, protocol: str
) -> None:
    """buf curl (1.75) prints an error's details as type and base64 value: it
    decodes only types compiled into its binary (connect-go's error writer),
    never through reflection. What it prints must decode with what this
    server's reflection serves, over the protocol buf speaks."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_reflection.v1alpha import reflection_pb2

    buf = tool("buf")
    failed = await asyncio.to_thread(
        subprocess.run,
        [
            buf,
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--reflect-protocol",
            protocol,
            "-d",
            '{"task": {"title": ""}}',
            f"http://{served.target}/tasks.v1.TaskService/CreateTask",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    printed = json.loads(failed.stdout + failed.stderr)
    assert printed["code"] == "invalid_argument"
    service = protocol.replace("grpc-", "grpc.reflection.")
    call = served.channel.stream_stream(
        f"/{service}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    pool = descriptor_pool.DescriptorPool()  # only what the server serves
    decoded: dict[str, Any] = {}
    for detail in printed["details"]:
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=detail["type"])
        [response] = [r async for r in call(iter([request]))]
        assert response.HasField("file_descriptor_response"), response.error_response
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in response.file_descriptor_response.file_descriptor_proto
        ]
        for file in reversed(files):  # dependencies first
            try:
                pool.FindFileByName(file.name)
            except KeyError:
                pool.Add(file)
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(detail["type"]))
        raw = detail["value"] + "=" * (-len(detail["value"]) % 4)
        decoded[detail["type"]] = cls.FromString(base64.b64decode(raw))
    assert decoded["google.rpc.ErrorInfo"].reason == "INVALID_ARGUMENT"
    violations = decoded["google.rpc.BadRequest"].field_violations
    assert [v.field for v in violations] == ["task.title"]
