"""A hostile soak: normal callers (CRUD and watchers) against a server
process, first alone (the quiet run), then while hostile callers hammer the
same server over raw HTTP/2: watchers that stop granting flow-control window
(while maximum-size tasks are updated), calls without a request message,
RST_STREAM storms, and batches cancelled after their half-close. Reported:
the normal callers' success rate and p99 in both runs, the server's RSS over
time, and whether every watcher slot comes back once the hostile callers
stop.

TASKSERVICE_HOSTILE_SOAK_SECONDS sets the hostile run's length (default 30;
the quiet run is a quarter of it, at least 5 s). Junk-token calls while the
certificate endpoint hangs are not part of it yet (see the report of issue
21, item 8).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import pytest
from google.protobuf import field_mask_pb2
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import ServerProcess
from tests.h2client import StalledStream, cancelled_client_stream, messageless_calls
from tests.helpers import create_request
from tests.reliability import record

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("TASKSERVICE_HOSTILE_SOAK_SECONDS", "30"))
CALLERS = 8  # normal CRUD callers
WATCHERS = 4  # normal watchers, reading everything
MAX_WATCHERS = 60  # the server's bound: stalled watchers press against it
WATCH_MEMORY_MB = 128  # as on deploy/service.yaml's 512 MiB instance
RSS_CEILING_MB = 400
WIDE = "\U0001f600"
WATCH = "/tasks.v1.TaskService/WatchTasks"


@dataclass
class Run:
    codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    watch_events: int = 0
    watch_errors: Counter[str] = field(default_factory=Counter)

    def success_rate(self) -> float:
        total = sum(self.codes.values())
        return self.codes["OK"] / total if total else 0.0

    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(len(ordered) * 0.99) - 1] * 1000 if ordered else 0.0


async def _crud(stub: task_service_pb2_grpc.TaskServiceStub, run: Run, stop: float) -> None:
    rng = random.Random()
    mask = field_mask_pb2.FieldMask(paths=["title"])
    while time.monotonic() < stop:
        started = time.perf_counter()
        try:
            task = await stub.CreateTask(create_request("normal"), timeout=10)
            await stub.GetTask(pb.GetTaskRequest(name=task.name), timeout=10)
            task = await stub.UpdateTask(
                pb.UpdateTaskRequest(
                    task=pb.Task(name=task.name, title=f"n{rng.random()}"), update_mask=mask
                ),
                timeout=10,
            )
            await stub.ListTasks(pb.ListTasksRequest(page_size=10), timeout=10)
            await stub.DeleteTask(pb.DeleteTaskRequest(name=task.name), timeout=10)
            run.codes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            run.codes[err.code().name] += 1
        run.latencies.append((time.perf_counter() - started) / 5)  # per call


async def _watch(stub: task_service_pb2_grpc.TaskServiceStub, run: Run, stop: float) -> None:
    while time.monotonic() < stop:
        call = stub.WatchTasks(pb.WatchTasksRequest())
        try:
            async with asyncio.timeout(max(0.1, stop - time.monotonic())):
                async for _ in call:
                    run.watch_events += 1
        except TimeoutError:
            call.cancel()
            return
        except grpc.aio.AioRpcError as err:
            run.watch_errors[err.code().name] += 1
            await asyncio.sleep(0.1)


async def _normal(target: str, seconds: float) -> Run:
    run = Run()
    stop = time.monotonic() + seconds
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    try:
        stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in channels]
        await asyncio.gather(
            *(_crud(stubs[i % 4], run, stop) for i in range(CALLERS)),
            *(_watch(stubs[i % 4], run, stop) for i in range(WATCHERS)),
        )
    finally:
        for c in channels:
            await c.close()
    return run


def _rst_storm(port: int, calls: int) -> None:
    """HEADERS, then RST_STREAM(CANCEL) at once, `calls` times on one connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for i in range(calls):
            stream = conn.get_next_available_stream_id()
            path = WATCH if i % 2 else "/tasks.v1.TaskService/GetTask"
            conn.send_headers(
                stream,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", path),
                    (":authority", f"127.0.0.1:{port}"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ],
            )
            conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        sock.sendall(conn.data_to_send())
        time.sleep(0.05)


def _hostile(port: int, stop: threading.Event, counts: Counter[str]) -> None:
    """One hostile caller: picks a kind of abuse at random, over and over."""
    rng = random.Random()
    held: list[StalledStream] = []
    try:
        while not stop.is_set():
            kind = rng.choice(("stall", "messageless", "rst", "cancelled_batch"))
            try:
                if kind == "stall":
                    for _ in range(5):
                        watch = StalledStream("127.0.0.1", port, WATCH, pb.WatchTasksRequest())
                        watch.read_until_messages(1, 2)
                        held.append(watch)
                    while len(held) > 20:  # the oldest go away, as real clients do
                        held.pop(0).close()
                elif kind == "messageless":
                    method = rng.choice(("GetTask", "CreateTask", "WatchTasks"))
                    messageless_calls(
                        "127.0.0.1", port, f"/tasks.v1.TaskService/{method}", 50, timeout=5
                    )
                elif kind == "rst":
                    _rst_storm(port, 200)
                else:
                    cancelled_client_stream(
                        "127.0.0.1",
                        port,
                        "/tasks.v1.TaskService/BatchCreateTasks",
                        [create_request("cancelled", tags=["cancelled"])] * 5,
                    )
                counts[kind] += 1
            except OSError:
                counts[f"{kind}_refused"] += 1
    finally:
        for watch in held:
            watch.close()


def _large_updates(target: str, stop: threading.Event, counts: Counter[str]) -> None:
    """Updates a maximum-size task over and over: what fills stalled windows."""
    with grpc.insecure_channel(target) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        task = stub.CreateTask(
            create_request(
                WIDE * 200,
                description=WIDE * 2000,
                assignee=WIDE * 256,
                tags=[f"{t:02d}" + WIDE * 62 for t in range(32)],
            )
        )
        mask = field_mask_pb2.FieldMask(paths=["description"])
        i = 0
        while not stop.wait(0.02):
            i += 1
            stub.UpdateTask(
                pb.UpdateTaskRequest(
                    task=pb.Task(name=task.name, description=f"{i:04d}" + WIDE * 1996),
                    update_mask=mask,
                ),
                timeout=10,
            )
            counts["large_updates"] += 1


async def _slots_recover(target: str) -> int:
    """How many of MAX_WATCHERS watchers are admitted now."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        calls = [stub.WatchTasks(pb.WatchTasksRequest()) for _ in range(MAX_WATCHERS)]
        admitted = 0
        for call in calls:
            try:
                first = await asyncio.wait_for(call.read(), 10)
                admitted += first.type == pb.WatchTasksResponse.TYPE_CURRENT
            except (grpc.aio.AioRpcError, TimeoutError):
                pass
        for call in calls:
            call.cancel()
        return admitted


async def test_normal_callers_hold_up_among_hostile_ones(tmp_path: Path) -> None:
    process = ServerProcess(
        {
            "TASKSERVICE_STORE": "sqlite",
            "TASKSERVICE_SQLITE_PATH": str(tmp_path / "t.db"),
            "TASKSERVICE_MAX_WATCHERS": str(MAX_WATCHERS),
            "TASKSERVICE_WATCH_MEMORY_MB": str(WATCH_MEMORY_MB),
        }
    )
    rss: list[tuple[float, float]] = []
    sampling = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not sampling.wait(1.0):
            rss.append((round(time.monotonic() - t0, 1), round(process.rss_mb(), 1)))

    sampler = threading.Thread(target=sample)
    try:
        await asyncio.to_thread(process.wait_serving)
        sampler.start()
        quiet = await _normal(process.target, max(5.0, SECONDS / 4))
        rss_before = process.rss_mb()

        stop = threading.Event()
        counts: Counter[str] = Counter()
        hostiles = [
            threading.Thread(target=_hostile, args=(process.port, stop, counts)) for _ in range(3)
        ]
        hostiles.append(
            threading.Thread(target=_large_updates, args=(process.target, stop, counts))
        )
        for t in hostiles:
            t.start()
        try:
            hostile = await _normal(process.target, SECONDS)
        finally:
            stop.set()
            for t in hostiles:
                await asyncio.to_thread(t.join, 30)
        await asyncio.sleep(2.0)  # hostile sockets closed: what they held comes back
        admitted = await _slots_recover(process.target)
        rss_after = process.rss_mb()
        sampling.set()
        await asyncio.to_thread(sampler.join)
        code, output = await asyncio.to_thread(process.stop)
    finally:
        sampling.set()
        process.kill()
    peak = max(r for _, r in rss)
    record(
        "hostile_soak",
        seconds=SECONDS,
        normal_callers=CALLERS,
        normal_watchers=WATCHERS,
        hostile=dict(counts),
        quiet_success=round(quiet.success_rate(), 5),
        hostile_success=round(hostile.success_rate(), 5),
        quiet_codes=dict(quiet.codes),
        hostile_codes=dict(hostile.codes),
        quiet_p99_ms=round(quiet.p99_ms(), 1),
        hostile_p99_ms=round(hostile.p99_ms(), 1),
        quiet_watch_events=quiet.watch_events,
        hostile_watch_events=hostile.watch_events,
        hostile_watch_errors=dict(hostile.watch_errors),
        rss_mb_before=round(rss_before, 1),
        rss_mb_peak=peak,
        rss_mb_after=round(rss_after, 1),
        rss_mb_over_time=rss[:: max(1, len(rss) // 20)],
        watcher_slots_recovered=f"{admitted}/{MAX_WATCHERS}",
        server_exit=code,
    )
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert quiet.success_rate() == 1.0, quiet.codes
    assert hostile.success_rate() == 1.0, hostile.codes
    # Normal watchers are ended only as the server allows (too slow, never
    # here: they read everything; or refused while stalled ones hold every
    # slot, which the hostile callers do on purpose).
    assert set(hostile.watch_errors) <= {"RESOURCE_EXHAUSTED"}, hostile.watch_errors
    assert all(counts[k] for k in ("stall", "messageless", "rst", "cancelled_batch")), counts
    assert admitted == MAX_WATCHERS  # every slot came back
    assert peak < RSS_CEILING_MB
    assert hostile.p99_ms() < max(10 * quiet.p99_ms(), 250), (quiet.p99_ms(), hostile.p99_ms())
