"""Firestore round trips per TaskService call, counted on the store's real channel."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from tasks.v1 import task_service_pb2 as pb

from harness import CallCounter, Emulator, Running, firestore_store, start_server
from tests.helpers import create_request, stream_of

pytestmark = pytest.mark.firestore


@pytest.fixture
async def counted(emulator: Emulator) -> AsyncIterator[tuple[Running, CallCounter]]:
    counter = CallCounter()
    running = await start_server(firestore_store(emulator.host, counter.interceptors()))
    yield running, counter
    await running.channel.close()
    await running.server.stop(grace=1)


async def test_round_trips_per_call(counted: tuple[Running, CallCounter]) -> None:
    running, counter = counted
    stub = running.stub

    counter.reset()
    task = await stub.CreateTask(create_request("t", tags=["a"]))
    assert counter.calls == {"Commit": 1} and counter.documents == 0 and counter.written == 1

    counter.reset()
    await stub.CreateTask(create_request("t", request_id=str(uuid.uuid4())))
    assert counter.calls == {"Commit": 1} and counter.documents == 0
    assert counter.written == 2  # the task and its request-id marker

    counter.reset()
    await stub.GetTask(pb.GetTaskRequest(name=task.name))
    assert counter.calls == {"GetDocument": 1} and counter.documents == 1 and counter.written == 0

    counter.reset()
    updated = await stub.UpdateTask(pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="u")))
    assert counter.calls == {"GetDocument": 1, "Commit": 1} and counter.documents == 1
    assert counter.written == 1

    counter.reset()
    await stub.UpdateTask(
        pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="v", etag=updated.etag))
    )
    assert counter.calls == {"GetDocument": 1, "Commit": 1}

    await stub.BatchCreateTasks(stream_of([create_request(f"b{i}") for i in range(30)]))
    counter.reset()
    page = await stub.ListTasks(pb.ListTasksRequest(page_size=10))
    assert counter.calls == {"RunQuery": 1} and counter.documents == 11  # page + 1 look-ahead
    counter.reset()
    await stub.ListTasks(pb.ListTasksRequest(page_size=10, page_token=page.next_page_token))
    assert counter.calls == {"RunQuery": 1}

    counter.reset()
    await stub.DeleteTask(pb.DeleteTaskRequest(name=task.name))
    assert counter.calls == {"Commit": 1} and counter.documents == 0 and counter.written == 1

    other = await stub.CreateTask(create_request("t"))
    counter.reset()
    await stub.DeleteTask(pb.DeleteTaskRequest(name=other.name, etag=other.etag))
    assert counter.calls == {"Commit": 1}


async def test_batch_of_500_is_one_commit(counted: tuple[Running, CallCounter]) -> None:
    running, counter = counted
    counter.reset()
    requests = [create_request(f"t{i}", request_id=str(uuid.uuid4())) for i in range(500)]
    response = await running.stub.BatchCreateTasks(stream_of(requests))
    assert len(response.tasks) == 500
    assert counter.calls == {"Commit": 1} and counter.documents == 0
    assert counter.written == 1000  # 500 tasks and 500 request-id markers
