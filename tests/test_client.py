"""taskservice.client against a real server that goes away and comes back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc as pb_grpc

from harness import Running, free_port
from taskservice import client as client_module
from taskservice.client import connect, error_details, is_stream_reset, parse_target
from taskservice.config import Config
from taskservice.runtime.server import TaskServer
from taskservice.store.sqlite import SqliteStore
from tests.h2client import grpc_frame
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


class _FlakyFront:
    """A raw HTTP/2 server standing in for a server or proxy in trouble: each
    call's first attempts fail the way `failures` says ("cancelled": a
    trailers-only CANCELLED, as grpc core answers a call that met its
    shutdown; "reset": response headers, then RST_STREAM INTERNAL_ERROR, as
    nginx does when it loses its upstream mid-call); later attempts get
    `answer`. Counts the attempts."""

    def __init__(self, failures: list[str], answer: pb.Task) -> None:
        self.failures = list(failures)
        self.answer = answer
        self.attempts = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        while data := conn.recv(65535):
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.StreamEnded):
                    self._answer(h2c, event.stream_id)
            conn.sendall(h2c.data_to_send())

    def _answer(self, h2c: h2.connection.H2Connection, stream: int) -> None:
        self.attempts += 1
        headers = [(":status", "200"), ("content-type", "application/grpc")]
        failure = self.failures.pop(0) if self.failures else None
        if failure == "cancelled":
            h2c.send_headers(stream, [*headers, ("grpc-status", "1")], end_stream=True)
        elif failure == "reset":
            h2c.send_headers(stream, headers)
            h2c.reset_stream(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
        else:
            h2c.send_headers(stream, headers)
            h2c.send_data(stream, grpc_frame(self.answer))
            h2c.send_headers(stream, [("grpc-status", "0")], end_stream=True)


@pytest.mark.parametrize("failure", ["cancelled", "reset"])
async def test_a_call_cut_by_a_shutdown_or_a_proxy_is_retried_when_safe(failure: str) -> None:
    answer = pb.Task(name="tasks/t", title="t")
    front = _FlakyFront([failure] * 2, answer)
    async with connect(f"127.0.0.1:{front.port}") as client:
        got = await client.stub.CreateTask(create_request("t", request_id=str(uuid.uuid4())))
        assert got == answer
        assert front.attempts == 3  # two failures, then the answer

        # Not safe to repeat (no request_id): the failure is the answer.
        front.failures = [failure]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.stub.CreateTask(create_request("no request id"))
        expected = grpc.StatusCode.CANCELLED if failure == "cancelled" else grpc.StatusCode.INTERNAL
        assert info.value.code() == expected
        assert front.attempts == 4


async def test_error_details_decode_what_the_server_said_and_nothing_else(
    running: Running,
) -> None:
    """client.error_details is the one decoder of google.rpc.Status details:
    a refused request's ErrorInfo and BadRequest fields; an error gRPC itself
    answers (no server at the address) carries no Status at all."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.stub.CreateTask(pb.CreateTaskRequest(task=pb.Task(title=" ")))
    details = error_details(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.has_status and details.has_error_info
    assert details.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert details.domain and details.reason and details.fields == ["task.title"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as nowhere:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.TaskServiceStub(nowhere).GetTask(pb.GetTaskRequest(name="tasks/x"))
    bare = error_details(info.value)
    assert bare.code == grpc.StatusCode.UNAVAILABLE
    assert not bare.has_status and bare.fields == [] and bare.reason == ""
    assert not is_stream_reset(info.value)
