"""The tasks.v1.TaskService servicer: validate, call the store, convert.

It is thin on purpose: validation.py turns requests into domain values, the
store does the work, and this module converts domain tasks back to protobuf.
It never knows which store it has. Every store call gets the time left of the
caller's deadline, capped at MAX_CALL_SECONDS when the caller set none.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc as pb_grpc

from taskservice import validation
from taskservice.errors import (
    AlreadyExists,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ServiceError,
)
from taskservice.filtering import parse_filter
from taskservice.model import Cursor, ListQuery, NewTask, Task, sort_time
from taskservice.pagination import decode_token, encode_token, fingerprint
from taskservice.store import MAX_BATCH, TaskStore
from taskservice.timestamps import set_from_ns

log = logging.getLogger(__name__)

MAX_CALL_SECONDS = 30.0  # server-side cap on a call with no deadline
R = TypeVar("R")


def to_proto(task: Task) -> pb.Task:
    c = task.content
    message = pb.Task(
        name="tasks/" + task.task_id,
        title=c.title,
        description=c.description,
        priority=pb.Task.Priority.ValueType(c.priority),
        state=pb.Task.State.ValueType(c.state),
        tags=c.tags,
        etag=task.etag,
    )
    set_from_ns(message.create_time, task.create_time_ns)
    set_from_ns(message.update_time, task.update_time_ns)
    if c.assignee:
        message.assignee = c.assignee
    return message


def time_left(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    remaining = context.time_remaining()
    if remaining is None:
        return MAX_CALL_SECONDS
    return max(0.0, min(remaining, MAX_CALL_SECONDS))


Handler = Callable[..., Awaitable[R]]


def _rpc(method: Handler[R]) -> Handler[R]:
    """Turns ServiceErrors into their status and anything unexpected into a
    generic INTERNAL (logged with an error id, never sent to the caller)."""

    @functools.wraps(method)
    async def handler(
        self: TaskServicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> R:
        try:
            return await method(self, request, context)
        except ServiceError as err:
            status = err.to_grpc_status()
        except TimeoutError:
            status = DeadlineExceeded("the call ran out of time").to_grpc_status()
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            error_id = uuid.uuid4().hex[:16]
            log.exception(
                "unhandled error in %s (error_id=%s)",
                method.__name__,
                error_id,
                extra={"fields": {"error_id": error_id}},
            )
            status = Internal(f"internal error (error_id={error_id})").to_grpc_status()
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("abort returned")  # pragma: no cover

    return handler


async def _idle_limited(
    messages: AsyncIterator[pb.CreateTaskRequest], idle_seconds: float
) -> AsyncIterator[pb.CreateTaskRequest]:
    """The stream's messages; a client silent for idle_seconds is cut off, so
    a stalled stream cannot hold a call slot forever."""
    iterator = aiter(messages)
    while True:
        try:
            async with asyncio.timeout(idle_seconds):
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(
                f"no message for {idle_seconds:g} s; the stream was ended and nothing was written",
                reason="STREAM_IDLE",
            ) from None
        yield message


async def _read_batch(messages: AsyncIterator[pb.CreateTaskRequest]) -> list[NewTask]:
    """Validates a BatchCreateTasks stream into NewTasks, naming requests[i]."""
    items: list[NewTask] = []
    task_ids: dict[str, int] = {}
    request_ids: dict[str, int] = {}
    async for request in messages:
        index = len(items)
        if index >= MAX_BATCH:
            raise InvalidArgument(
                [("requests", f"at most {MAX_BATCH} tasks per call; nothing was written")],
                reason="BATCH_TOO_LARGE",
            )
        try:
            item = validation.new_task(request)
        except InvalidArgument as err:
            raise err.prefixed(f"requests[{index}]") from None
        if request.task_id and item.task_id in task_ids:
            raise InvalidArgument(
                [(f"requests[{index}].task_id", f"repeats requests[{task_ids[item.task_id]}]")]
            )
        if item.request_id is not None and item.request_id in request_ids:
            first = request_ids[item.request_id]
            raise InvalidArgument([(f"requests[{index}].request_id", f"repeats requests[{first}]")])
        task_ids[item.task_id] = index
        if item.request_id is not None:
            request_ids[item.request_id] = index
        items.append(item)
    return items


async def _drain(messages: AsyncIterator[pb.CreateTaskRequest], limit: int) -> None:
    count = 0
    try:
        async for _ in messages:
            count += 1
            if count >= limit:
                return
    except ServiceError:
        return  # idle or malformed: stop reading, the first error stands


class TaskServicer(pb_grpc.TaskServiceServicer):
    """Serves tasks.v1.TaskService over any TaskStore."""

    def __init__(self, store: TaskStore, stream_idle_seconds: float = 10.0) -> None:
        self.store = store
        self.stream_idle_seconds = stream_idle_seconds

    @_rpc
    async def CreateTask(
        self, request: pb.CreateTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Task:
        new = validation.new_task(request)
        tasks = await self.store.create_many([new], time_left(context))
        return to_proto(tasks[0])

    @_rpc
    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Task:
        task_id = validation.task_id_from_name(request.name, "name")
        return to_proto(await self.store.get(task_id, time_left(context)))

    @_rpc
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTasksResponse:
        limit = validation.page_size(request.page_size)
        task_filter = parse_filter(request.filter)
        ordering = validation.ordering(request.order_by)
        query_fp = fingerprint(task_filter, ordering)
        after: Cursor | None = None
        if request.page_token:
            after = decode_token(request.page_token, query_fp)
        result = await self.store.list(
            ListQuery(filter=task_filter, ordering=ordering, limit=limit, after=after),
            time_left(context),
        )
        next_token = ""
        if result.more and result.tasks:
            last = result.tasks[-1]
            next_token = encode_token(Cursor(sort_time(last, ordering), last.task_id), query_fp)
        return pb.ListTasksResponse(
            tasks=[to_proto(t) for t in result.tasks], next_page_token=next_token
        )

    @_rpc
    async def UpdateTask(
        self, request: pb.UpdateTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Task:
        task_id, patch, etag = validation.update(request)
        return to_proto(await self.store.update(task_id, patch, etag, time_left(context)))

    @_rpc
    async def DeleteTask(
        self, request: pb.DeleteTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        task_id, etag = validation.delete(request)
        await self.store.delete(task_id, etag, time_left(context))
        return empty_pb2.Empty()

    @_rpc
    async def BatchCreateTasks(
        self,
        request_iterator: AsyncIterator[pb.CreateTaskRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.BatchCreateTasksResponse:
        messages = _idle_limited(request_iterator, self.stream_idle_seconds)
        try:
            items = await _read_batch(messages)
        except InvalidArgument as err:
            if err.reason != "BATCH_TOO_LARGE":
                # Read what the client is still sending (a batch is bounded)
                # before answering, so it receives this status rather than a
                # transport error for a stream closed under its feet.
                await _drain(messages, MAX_BATCH)
            raise
        if not items:
            return pb.BatchCreateTasksResponse()
        try:
            tasks = await self.store.create_many(items, time_left(context))
        except AlreadyExists as err:
            raise AlreadyExists(
                f"requests[{err.index}].task_id: {err.message}; nothing was written",
                index=err.index,
                name=err.name,
            ) from None
        return pb.BatchCreateTasksResponse(tasks=[to_proto(t) for t in tasks])
