"""Slow and stalled clients cannot hold resources forever, and other callers
keep their latency while they try."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import Running, start_server
from taskservice.config import Config
from taskservice.store.sqlite import SqliteStore
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
