"""Slow and stalled clients cannot hold resources forever, and other callers
keep their latency while they try."""

from __future__ import annotations

import asyncio
import base64
import logging
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import Running, start_server
from taskservice.calls import STATUS_SEND_SECONDS, Pool
from taskservice.config import Config
from taskservice.store.sqlite import SqliteStore
from tests.h2client import StalledStream
from tests.helpers import create_request, expect_error
from tests.reliability import record

pytestmark = pytest.mark.slow


async def _start(tmp_path: Path, **config: Any) -> Running:
    return await start_server(
        SqliteStore(tmp_path / "t.db"), Config(host="127.0.0.1", port=0, **config)
    )


async def _stalled(
    first: pb.CreateTaskRequest, stop: asyncio.Event
) -> AsyncIterator[pb.CreateTaskRequest]:
    yield first
    await stop.wait()  # then says nothing more


async def test_stalled_streams_are_cut_off_and_others_keep_their_latency(tmp_path: Path) -> None:
    running = await _start(tmp_path, stream_idle_seconds=1.0)
    stop = asyncio.Event()
    try:
        task = await running.stub.CreateTask(create_request("probe"))
        baseline = []
        for _ in range(100):
            t0 = time.perf_counter()
            await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
            baseline.append(time.perf_counter() - t0)

        # 50 streams, each on its own connection, send one message and stall.
        channels = [grpc.aio.insecure_channel(running.target) for _ in range(50)]
        stalled = [
            asyncio.ensure_future(
                task_service_pb2_grpc.TaskServiceStub(c).BatchCreateTasks(
                    _stalled(create_request(f"stalled {i}"), stop)
                )
            )
            for i, c in enumerate(channels)
        ]
        started = time.monotonic()
        during = []
        while time.monotonic() - started < 0.8:
            t0 = time.perf_counter()
            await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
            during.append(time.perf_counter() - t0)
        codes = []
        for call in stalled:
            details = await expect_error(call, grpc.StatusCode.DEADLINE_EXCEEDED)
            codes.append(details.reason)
        cut_after = time.monotonic() - started
        assert set(codes) == {"STREAM_IDLE"}
        assert cut_after < 3
        listed = await running.stub.ListTasks(pb.ListTasksRequest())
        assert [t.title for t in listed.tasks] == ["probe"]  # nothing half-written
        p99_before = statistics.quantiles(baseline, n=100)[98] * 1000
        p99_during = statistics.quantiles(during, n=100)[98] * 1000
        record(
            "stalled_streams",
            stalled_streams=50,
            cut_off_after_s=round(cut_after, 2),
            get_p99_ms_before=round(p99_before, 2),
            get_p99_ms_during=round(p99_during, 2),
            get_calls_during=len(during),
        )
        assert p99_during < max(20 * p99_before, 25)
        for c in channels:
            await c.close()
    finally:
        stop.set()
        await running.channel.close()
        await running.server.stop(grace=0)


async def test_concurrent_calls_are_bounded(tmp_path: Path) -> None:
    running = await _start(tmp_path, stream_idle_seconds=5.0, max_concurrent_rpcs=4)
    stop = asyncio.Event()
    try:
        stalled = [
            asyncio.ensure_future(
                running.stub.BatchCreateTasks(_stalled(create_request("s"), stop))
            )
            for _ in range(4)
        ]
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.GetTask(pb.GetTaskRequest(name="tasks/x"), timeout=2)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stop.set()
        results = await asyncio.gather(*stalled)
        assert all(len(r.tasks) == 1 for r in results)
        await expect_error(
            running.stub.GetTask(pb.GetTaskRequest(name="tasks/x")), grpc.StatusCode.NOT_FOUND
        )
    finally:
        stop.set()
        await running.channel.close()
        await running.server.stop(grace=0)


# -- a watcher stalled at the transport (issue 21, item 1) ----------------------


def _big(title: str) -> pb.CreateTaskRequest:
    return create_request(title, description="d" * 2000)


async def test_a_watcher_stalled_at_the_transport_frees_its_slot_when_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A WatchTasks caller that stops granting flow-control window while
    updates commit: ended as too slow, its slot is free at once (with one
    slot, the next watcher gets in), its access line is written then, and
    when it grants window again it receives the status with the resume token
    of the last event it received."""
    running = await _start(tmp_path, max_watchers=1, watch_buffer=10)
    caplog.set_level(logging.INFO)
    stalled: StalledStream | None = None
    try:
        task = await running.stub.CreateTask(_big("big"))
        stalled = await asyncio.to_thread(
            StalledStream,
            "127.0.0.1",
            running.server.port,
            "/tasks.v1.TaskService/WatchTasks",
            pb.WatchTasksRequest(),
        )
        await asyncio.to_thread(stalled.read_without_granting, 0.5)
        assert running.server.gate.in_flight[Pool.WATCHERS] == 1
        mask = field_mask_pb2.FieldMask(paths=["title"])
        for i in range(60):  # ~2 KB each: far past the window and the buffer of 10
            await running.stub.UpdateTask(
                pb.UpdateTaskRequest(task=pb.Task(name=task.name, title=f"v{i}"), update_mask=mask)
            )
        ended_by = time.monotonic() + 2
        while running.server.gate.in_flight[Pool.WATCHERS] and time.monotonic() < ended_by:
            await asyncio.sleep(0.05)
        assert running.server.gate.in_flight[Pool.WATCHERS] == 0, "the slot was kept"

        def lines() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "taskservice.access" and "WatchTasks" in r.getMessage()
            ]

        # The access line follows within the grace the message in flight gets.
        while not lines() and time.monotonic() < ended_by + 1.5:
            await asyncio.sleep(0.05)
        assert lines() == ["/tasks.v1.TaskService/WatchTasks RESOURCE_EXHAUSTED"]
        # The slot is free: another watcher gets in.
        other = running.stub.WatchTasks(pb.WatchTasksRequest())
        assert (await asyncio.wait_for(other.read(), 5)).type == pb.WatchTasksResponse.TYPE_CURRENT
        other.cancel()
        # The stalled caller grants window again: it gets what was in flight,
        # then the status, with the resume token of the last event it got.
        await asyncio.to_thread(stalled.resume, 10)
        assert stalled.trailers is not None, "no status"
        assert stalled.trailers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        status = status_pb2.Status.FromString(
            base64.b64decode(stalled.trailers["grpc-status-details-bin"] + "==")
        )
        info = error_details_pb2.ErrorInfo()
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
        assert info.reason == "WATCHER_TOO_SLOW"
        last = pb.WatchTasksResponse.FromString(stalled.messages()[-1])
        assert info.metadata["resume_token"] == last.resume_token
        stalled.close()

        # One that never grants window again: the server gives up on its
        # status after STATUS_SEND_SECONDS, quietly, and its socket closing
        # later logs nothing either.
        stalled = await asyncio.to_thread(
            StalledStream,
            "127.0.0.1",
            running.server.port,
            "/tasks.v1.TaskService/WatchTasks",
            pb.WatchTasksRequest(),
        )
        await asyncio.to_thread(stalled.read_without_granting, 0.5)
        for i in range(60):
            await running.stub.UpdateTask(
                pb.UpdateTaskRequest(task=pb.Task(name=task.name, title=f"w{i}"), update_mask=mask)
            )
        await asyncio.sleep(0.5)
        assert running.server.gate.in_flight[Pool.WATCHERS] == 0
        await asyncio.to_thread(stalled.read_without_granting, STATUS_SEND_SECONDS + 1)
        stalled.close()
        await asyncio.sleep(0.5)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
            r.getMessage()[:300] for r in caplog.records if r.levelno >= logging.WARNING
        ]
    finally:
        if stalled is not None:
            stalled.close()
        await running.channel.close()
        await running.server.stop(grace=0)
