"""The framework's own ceiling: a bare grpc.aio server answering GetTask with a
canned Task of the same size as TaskService's, with the same server options,
one process, no store, no interceptors.

    python -m bench.echo PORT [--read]

With --read, GetTask is registered as TaskService registers its one-message
methods: client-streaming, the handler reading its one message itself
(taskservice.api.calls says why). bench.stages compares the two.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, cast

import grpc
from google.protobuf import timestamp_pb2
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from taskservice.runtime.server import SERVER_OPTIONS, wait_for_stop_signal

TASK = pb.Task(
    name="tasks/0b6c1e9a-3f1e-4a55-9d7e-2f3c8f1f0a11",
    title="Write the runbook for the on-call rotation",
    description="Cover paging, escalation and the first five minutes.",
    priority=pb.Task.PRIORITY_HIGH,
    state=pb.Task.STATE_OPEN,
    assignee="ana@example.com",
    tags=["ops", "docs"],
    create_time=timestamp_pb2.Timestamp(seconds=1_790_000_000, nanos=123_456_789),
    update_time=timestamp_pb2.Timestamp(seconds=1_790_000_000, nanos=123_456_789),
    etag="18ec1452fe7c8c68",
)


class Echo(task_service_pb2_grpc.TaskServiceServicer):
    async def GetTask(self, request: pb.GetTaskRequest, context: Any) -> pb.Task:
        return TASK


async def get_reading(
    requests: object, context: grpc.aio.ServicerContext[bytes, pb.Task]
) -> pb.Task:
    pb.GetTaskRequest.FromString(cast(bytes, await context.read()))
    return TASK


async def serve(port: int, read: bool) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    if read:
        handlers = {
            "GetTask": grpc.stream_unary_rpc_method_handler(
                get_reading, response_serializer=pb.Task.SerializeToString
            )
        }
        server.add_registered_method_handlers("tasks.v1.TaskService", handlers)
    else:
        # Only GetTask is served; the other methods keep the base class's
        # UNIMPLEMENTED (the typed stubs declare them abstract).
        echo = Echo()  # type: ignore[abstract]
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(echo, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await wait_for_stop_signal()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), "--read" in sys.argv[2:]))
