"""The tasks.v1.TaskService servicer: parse, call the store, convert back.

It is thin on purpose: taskservice.api.convert turns requests into domain values
and results into messages, the store does the work, and errors raised on the
way are turned into statuses by the call pipeline (taskservice.api.calls). It
never knows which store it has. Every store call gets the time left of the
caller's deadline, at most limits.MAX_STORE_CALL_SECONDS.

BatchCreateTasks reads its whole stream before it writes anything, within the
stream's idle and total time limits. For callers on Node's http2 (grpc-js),
whose cancel sends END_STREAM before RST_STREAM, it then gives a reset already
on the wire BATCH_CANCEL_GRACE_SECONDS to arrive: a call cancelled before its
commit starts writes nothing (one whose cancel races the commit may still
commit, which is why retries carry request_id).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from google.protobuf import empty_pb2
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc as pb_grpc

from taskservice.api import convert
from taskservice.api._access import Context
from taskservice.api.calls import StreamControl, current_stream, time_left
from taskservice.api.watching import WatchMemory, WatchSettings, serve_watch
from taskservice.domain.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ServiceError,
)
from taskservice.domain.limits import BATCH_CANCEL_GRACE_SECONDS, MAX_BATCH
from taskservice.domain.model import NewTask
from taskservice.store import TaskStore


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


async def _drain(messages: AsyncIterator[pb.CreateTaskRequest], limit: int) -> None:
    count = 0
    try:
        async for _ in messages:
            count += 1
            if count >= limit:
                return
    except ServiceError:
        return  # idle or malformed: stop reading, the first error stands


# Whose cancel of a client stream sends END_STREAM before RST_STREAM, by the
# user-agent they send. Node's http2 module ends a stream's writable side
# before it submits the reset when the stream is closed early (closeStream in
# nodejs/node lib/internal/http2/core.js: `stream.end()`, then
# finishCloseStream), and grpc-js's call.cancel() closes the stream that way
# (grpc/grpc-node, packages/grpc-js/src/subchannel-call.ts), as does any
# client on Node's http2. Measured with interop/node: the reset trails
# END_STREAM by up to ~135 ms on a loaded machine (limits.py). gRPC's C core
# (Python, C++, Ruby, PHP), grpc-go and grpc-java send RST_STREAM alone, so for
# them END_STREAM is the caller's own end of the batch and no grace is owed.
_END_STREAM_BEFORE_RESET = ("grpc-node-js/", "connect-es/")


def _cancel_sends_end_stream_first(context: Context) -> bool:
    for key, value in context.invocation_metadata() or ():
        if key == "user-agent":
            agent = value if isinstance(value, str) else value.decode(errors="replace")
            return any(marker in agent for marker in _END_STREAM_BEFORE_RESET)
    return False


class TaskServicer(pb_grpc.TaskServiceServicer):
    """Serves tasks.v1.TaskService over any TaskStore."""

    def __init__(
        self,
        store: TaskStore,
        stream_idle_seconds: float = 10.0,
        stream_max_seconds: float = 60.0,
        watch: WatchSettings | None = None,
    ) -> None:
        self.store = store
        self.stream_idle_seconds = stream_idle_seconds
        self.stream_max_seconds = stream_max_seconds
        self.watch = watch or WatchSettings()
        self.watch_memory = WatchMemory(self.watch.memory_bytes)

    async def CreateTask(self, request: pb.CreateTaskRequest, context: Context) -> pb.Task:
        new = convert.parse_create_request(request)
        tasks = await self.store.create_many([new], time_left(context))
        return convert.to_proto(tasks[0])

    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.Task:
        task_id = convert.parse_get_request(request)
        return convert.to_proto(await self.store.get(task_id, time_left(context)))

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        parsed = convert.parse_list_request(request)
        result = await self.store.list(parsed.query, time_left(context))
        return convert.list_response(result, parsed)

    async def UpdateTask(self, request: pb.UpdateTaskRequest, context: Context) -> pb.Task:
        parsed = convert.parse_update_request(request)
        task = await self.store.update(
            parsed.task_id, parsed.patch, parsed.expected_version, time_left(context)
        )
        return convert.to_proto(task)

    async def DeleteTask(self, request: pb.DeleteTaskRequest, context: Context) -> empty_pb2.Empty:
        parsed = convert.parse_delete_request(request)
        await self.store.delete(parsed.task_id, parsed.expected_version, time_left(context))
        return empty_pb2.Empty()

    async def BatchCreateTasks(
        self, request_iterator: AsyncIterator[pb.CreateTaskRequest], context: Context
    ) -> pb.BatchCreateTasksResponse:
        items = await self._read_batch(request_iterator)
        if not items:
            return pb.BatchCreateTasksResponse()
        # gRPC ends the request iterator alike when the caller half-closes,
        # resets the stream mid-batch or lets its deadline pass
        # (context.cancelled() is still False then). A send tells them apart:
        # on a call already ended it fails, and this handler is cancelled in
        # the await, before anything is written. The response headers go out
        # a little early; no extra frame.
        await context.send_initial_metadata(())
        if _cancel_sends_end_stream_first(context):
            # The stream has ended, but from a caller whose cancel also looks
            # like this: it must not find its batch written. Once gRPC core
            # has taken the half-close as the call's close, it only notices a
            # reset that follows when it next sends on the stream: so give a
            # reset already on the wire the grace to arrive (this call is then
            # cancelled, in the sleep), and check once more.
            await asyncio.sleep(BATCH_CANCEL_GRACE_SECONDS)
            if context.cancelled() or context.done():
                raise Cancelled("the call was cancelled; nothing was written")
        try:
            tasks = await self.store.create_many(items, time_left(context))
        except AlreadyExists as err:
            raise AlreadyExists(
                f"requests[{err.index}].task_id: {err.message}; nothing was written",
                index=err.index,
                name=err.name,
            ) from None
        return pb.BatchCreateTasksResponse(tasks=[convert.to_proto(t) for t in tasks])

    async def WatchTasks(
        self, request: pb.WatchTasksRequest, context: Context
    ) -> AsyncIterator[pb.WatchTasksResponse]:
        query = convert.parse_watch_request(request, self.watch.progress_seconds)
        control = current_stream.get() or StreamControl()
        messages = serve_watch(
            self.store.watch(query),
            query,
            convert.watch_response,
            self.watch,
            control,
            self.watch_memory,
        )
        async for message in messages:
            yield message

    async def _read_batch(
        self, request_iterator: AsyncIterator[pb.CreateTaskRequest]
    ) -> list[NewTask]:
        """The whole stream, validated, within the idle limit and the stream's
        total time limit (stream_max_seconds; the caller's deadline, when it is
        sooner, ends the call anyway)."""
        messages = _idle_limited(request_iterator, self.stream_idle_seconds)
        limit = self.stream_max_seconds
        deadline = asyncio.get_running_loop().time() + limit
        try:
            async with asyncio.timeout_at(deadline):
                return await convert.read_batch(messages)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the stream took longer than {limit:g} s; it was ended and nothing was written",
                reason="STREAM_TOO_SLOW",
            ) from None
        except InvalidArgument as err:
            if err.reason not in ("BATCH_TOO_LARGE", "BATCH_RESPONSE_TOO_LARGE"):
                # Read what the client is still sending (a batch is bounded,
                # and so is the time to read it) before answering, so it
                # receives this status rather than a transport error for a
                # stream closed under its feet.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await _drain(messages, MAX_BATCH)
            raise
