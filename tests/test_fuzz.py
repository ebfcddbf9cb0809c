"""Hostile input: property-based fuzzing of every RPC against a real server
process, on each store. Every answer must be a canonical code other than
INTERNAL/UNKNOWN/UNAVAILABLE, and the server must stay up.

Besides arbitrary text, the strategies draw values that pass the syntax
checks, where the stores' own rules are reached: well-formed etags (around
real versions, at the int64 edges, not whole microseconds), page tokens minted
with the service's own format for forged cursors, valid task ids and
request ids."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import ServerProcess, free_port
from taskservice.domain.model import Cursor, OrderField, Ordering, TaskFilter
from taskservice.domain.tokens import encode_token, fingerprint
from tests.reliability import record

pytestmark = pytest.mark.slow

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # over the 64 KiB message limit
}
EXAMPLES = int(os.environ.get("TASKSERVICE_FUZZ_EXAMPLES", "300"))
CODES: Counter[str] = Counter()

# Strings: any code point but lone surrogates (protobuf cannot send them; raw
# invalid UTF-8 is covered by the bytes test), control characters, unicode,
# path tricks, and now and then something huge.
text = st.one_of(
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=80),
    st.sampled_from(
        [
            "",
            " ",
            "tasks/",
            "tasks/..",
            "tasks/a/b",
            "../x",
            "/",
            "\x00",
            "é" * 201,
            "tasks/" + "a" * 64,
            "tasks/ok",
            "*",
            "STATE_OPEN",
            'tags:"x"',
        ]
    ),
    st.integers(1, 70_000).map(lambda n: "x" * n),
)
enum_number = st.one_of(st.integers(-5, 8), st.integers(-(2**31), 2**31 - 1))
tags = st.lists(text, max_size=40)

# Values that pass the syntax checks.
task_id = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
name = st.one_of(text, task_id.map(lambda t: f"tasks/{t}"))
request_id = st.uuids().map(str)
now_us = 1_790_000_000_000_000
version = st.one_of(
    st.integers(1, 2**64 - 1),
    st.integers(now_us - 10**9, now_us + 10**9).map(lambda us: us * 1000),
    st.integers(now_us - 10**9, now_us + 10**9).map(lambda us: us * 1000 + 1),
    st.sampled_from([0, 1000, 2**63 - 1000, 2**63 - 1, 2**63, 2**64 - 1]),
)
etag = st.one_of(text, version.map(lambda v: format(v, "x")))
ORDERINGS = [Ordering(f, d) for f in OrderField for d in (True, False)]
ORDER_BY = {
    Ordering(OrderField.CREATE_TIME, True): "create_time desc",
    Ordering(OrderField.CREATE_TIME, False): "create_time",
    Ordering(OrderField.UPDATE_TIME, True): "update_time desc",
    Ordering(OrderField.UPDATE_TIME, False): "update_time",
}


@st.composite
def minted_pages(draw: Any) -> pb.ListTasksRequest:
    """A ListTasksRequest whose page_token is well formed for its order_by:
    the cursor (time and task id) is whatever hypothesis draws."""
    ordering = draw(st.sampled_from(ORDERINGS))
    cursor = Cursor(
        draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 2 * now_us * 1000))),
        draw(st.one_of(task_id, st.text(max_size=70))),
    )
    token = encode_token(cursor, fingerprint(TaskFilter(), ordering))
    return pb.ListTasksRequest(
        page_token=token, order_by=ORDER_BY[ordering], page_size=draw(st.integers(0, 300))
    )


@st.composite
def tasks(draw: Any) -> pb.Task:
    task = pb.Task(
        name=draw(name), title=draw(text), description=draw(text), tags=draw(tags), etag=draw(etag)
    )
    task.priority = draw(enum_number)
    task.state = draw(enum_number)
    if draw(st.booleans()):
        task.assignee = draw(text)
    return task


@st.composite
def create_requests(draw: Any) -> pb.CreateTaskRequest:
    request = pb.CreateTaskRequest(
        task_id=draw(st.one_of(text, task_id)), request_id=draw(st.one_of(text, request_id))
    )
    if draw(st.booleans()):
        request.task.CopyFrom(draw(tasks()))
    return request


@pytest.fixture(scope="module", params=["sqlite", "firestore"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = {"TASKSERVICE_STORE": request.param}
    if request.param == "sqlite":
        env["TASKSERVICE_SQLITE_PATH"] = str(tmp_path_factory.mktemp("fuzz") / "t.db")
    else:
        env["FIRESTORE_EMULATOR_HOST"] = request.getfixturevalue("emulator").host
        env["GOOGLE_CLOUD_PROJECT"] = f"demo-fuzz{free_port()}"
    CODES.clear()
    server = ServerProcess(env)
    yield server.target
    alive = server.proc.poll() is None
    code, output = server.stop()
    assert alive, "the server died during fuzzing"
    assert "Traceback" not in output or "error_id" in output
    record(
        "fuzz",
        store=request.param,
        inputs=sum(CODES.values()),
        codes=dict(CODES),
        server_exit=code,
    )
    assert code == 0


@pytest.fixture(scope="module")
def stub(server: str) -> Iterator[task_service_pb2_grpc.TaskServiceStub]:
    channel = grpc.insecure_channel(server)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield task_service_pb2_grpc.TaskServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    channel.close()


def check(call: Any, *args: Any) -> None:
    try:
        call(*args, timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
        assert code in ALLOWED, f"{code}: {err.details()}"
        assert "Traceback" not in (err.details() or "")
    CODES[code.name] += 1


fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@fuzz
@given(request=create_requests())
def test_create(stub: Any, request: pb.CreateTaskRequest) -> None:
    check(stub.CreateTask, request)


@fuzz
@given(name=name)
def test_get(stub: Any, name: str) -> None:
    check(stub.GetTask, pb.GetTaskRequest(name=name))


@fuzz
@given(task=tasks(), paths=st.one_of(st.none(), st.lists(text, max_size=8)))
def test_update(stub: Any, task: pb.Task, paths: list[str] | None) -> None:
    request = pb.UpdateTaskRequest(task=task)
    if paths is not None:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    check(stub.UpdateTask, request)


@fuzz
@given(name=name, etag=etag)
def test_delete(stub: Any, name: str, etag: str) -> None:
    check(stub.DeleteTask, pb.DeleteTaskRequest(name=name, etag=etag))


@fuzz
@given(data=st.data())
def test_etags_around_a_real_version(stub: Any, data: st.DataObject) -> None:
    """Update and delete a real task with etags near its own version: only
    OK (the exact one), ABORTED or INVALID_ARGUMENT may come back."""
    task = stub.CreateTask(pb.CreateTaskRequest(task=pb.Task(title="etag target")), timeout=10)
    version = int(task.etag, 16)
    delta = data.draw(st.sampled_from([0, 1, -1, 1000, -1000, 10**9, -(10**12), 2**40]))
    guess = format(max(version + delta, 0), "x")
    if data.draw(st.booleans()):
        check(
            stub.UpdateTask,
            pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="u", etag=guess)),
        )
    else:
        check(stub.DeleteTask, pb.DeleteTaskRequest(name=task.name, etag=guess))


@fuzz
@given(request=minted_pages())
def test_minted_page_tokens(stub: Any, request: pb.ListTasksRequest) -> None:
    check(stub.ListTasks, request)


@fuzz
@given(page_size=enum_number, page_token=text, filter_=text, order_by=text)
def test_list(stub: Any, page_size: int, page_token: str, filter_: str, order_by: str) -> None:
    request = pb.ListTasksRequest(
        page_size=page_size, page_token=page_token, filter=filter_, order_by=order_by
    )
    check(stub.ListTasks, request)


@fuzz
@given(requests=st.lists(create_requests(), max_size=6))
def test_batch(stub: Any, requests: list[pb.CreateTaskRequest]) -> None:
    check(stub.BatchCreateTasks, iter(requests))


METHODS = ["CreateTask", "GetTask", "ListTasks", "UpdateTask", "DeleteTask"]


@fuzz
@given(
    method=st.sampled_from(METHODS),
    raw=st.one_of(
        st.binary(max_size=300),
        st.just(b"\x0a\x03\xed\xa0\x80"),  # a string field holding a lone surrogate (invalid UTF-8)
        st.just(b"\x12\x05\x12\x03\xff\xfe\xfd"),
    ),
)
def test_raw_bytes(server: str, method: str, raw: bytes) -> None:
    with grpc.insecure_channel(server) as channel:
        call = channel.unary_unary(f"/tasks.v1.TaskService/{method}")
        check(call, raw)


def test_raw_bytes_in_a_batch_stream(server: str) -> None:
    with grpc.insecure_channel(server) as channel:
        call = channel.stream_unary("/tasks.v1.TaskService/BatchCreateTasks")
        valid = pb.CreateTaskRequest(task=pb.Task(title="ok")).SerializeToString()
        try:
            call(iter([valid, b"\xff\xff\xff"]), timeout=10)
            raise AssertionError("a corrupt message must be rejected")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "requests[1]" in (err.details() or "")


def test_limits_have_clear_errors(stub: Any) -> None:
    huge = pb.CreateTaskRequest(task=pb.Task(title="x" * 70_000))
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateTask(huge, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    too_many = pb.CreateTaskRequest(task=pb.Task(title="t", tags=[f"t{i}" for i in range(33)]))
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateTask(too_many, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "task.tags" in (info.value.details() or "")
    # A filter reaching outside the allowed fields never reaches a query.
    for bad in ['__name__ = "tasks/x"', 'title = "x"', 'create_time > "2020"', "description:*"]:
        with pytest.raises(grpc.RpcError) as info:
            stub.ListTasks(pb.ListTasksRequest(filter=bad), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
