"""A bounded soak: 64 concurrent mixed callers against a server process, on
each store, then a checker reconciles the store with what the callers were
told: no lost acknowledged write, no phantom, no duplicate from a retried
request_id, exactly one winner per etag among racing updates.

TASKSERVICE_SOAK_SECONDS sets the length (default 60 s per store).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import ServerProcess, health_serving
from tests.helpers import Ledger, create_request, everything, reconcile
from tests.reliability import record

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("TASKSERVICE_SOAK_SECONDS", "60"))
CALLERS = 64
HOT_TASKS = 4
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def _call(ledger: Ledger, rpc: Any, request: Any) -> Any:
    started = time.perf_counter()
    try:
        response = await rpc(request, timeout=10)
        ledger.codes["OK"] += 1
        return response
    except grpc.aio.AioRpcError as err:
        ledger.codes[err.code().name] += 1
        raise
    finally:
        ledger.latencies.append(time.perf_counter() - started)


async def _create(ledger: Ledger, stub: Any, owned: list[pb.Task]) -> None:
    request_id = str(uuid.uuid4())
    ledger.attempted_request_ids.add(request_id)
    request = create_request("soak", description=request_id, request_id=request_id)
    for attempt in range(3):  # a retry with the same request_id must not duplicate
        try:
            task = await _call(ledger, stub.CreateTask, request)
        except grpc.aio.AioRpcError as err:
            if err.code() not in RETRYABLE:
                raise
            ledger.retries += attempt > 0
            continue
        ledger.acked[task.name] = request_id
        ledger.titles[task.name] = task.title
        owned.append(task)
        return


async def _batch(ledger: Ledger, stub: Any, owned: list[pb.Task]) -> None:
    requests = []
    for _ in range(10):
        request_id = str(uuid.uuid4())
        ledger.attempted_request_ids.add(request_id)
        requests.append(create_request("soak", description=request_id, request_id=request_id))

    async def stream() -> Any:
        for r in requests:
            yield r

    started = time.perf_counter()
    try:
        response = await stub.BatchCreateTasks(stream(), timeout=10)
        ledger.codes["OK"] += 1
    except grpc.aio.AioRpcError as err:
        ledger.codes[err.code().name] += 1
        return
    finally:
        ledger.latencies.append(time.perf_counter() - started)
    for task in response.tasks:
        ledger.acked[task.name] = task.description
        ledger.titles[task.name] = task.title
        owned.append(task)


async def _update_own(ledger: Ledger, stub: Any, owned: list[pb.Task], rng: random.Random) -> None:
    i = rng.randrange(len(owned))
    task = owned[i]
    title = f"v{rng.randrange(10**9)}"
    request = pb.UpdateTaskRequest(task=pb.Task(name=task.name, title=title, etag=task.etag))
    try:
        owned[i] = await _call(ledger, stub.UpdateTask, request)
        ledger.titles[task.name] = title
        ledger.uncertain_titles.pop(task.name, None)
    except grpc.aio.AioRpcError as err:
        if err.code() in RETRYABLE:
            ledger.uncertain_titles[task.name].add(title)


async def _delete_own(ledger: Ledger, stub: Any, owned: list[pb.Task], rng: random.Random) -> None:
    task = owned.pop(rng.randrange(len(owned)))
    try:
        await _call(ledger, stub.DeleteTask, pb.DeleteTaskRequest(name=task.name, etag=task.etag))
        ledger.deleted.add(task.name)
    except grpc.aio.AioRpcError as err:
        if err.code() in RETRYABLE:
            ledger.uncertain_titles[task.name].add("<deleted>")


async def _race(ledger: Ledger, stub: Any, hot: list[str], rng: random.Random) -> None:
    name = rng.choice(hot)
    current = await _call(ledger, stub.GetTask, pb.GetTaskRequest(name=name))
    request = pb.UpdateTaskRequest(
        task=pb.Task(name=name, title=f"r{rng.randrange(10**9)}", etag=current.etag)
    )
    try:
        await _call(ledger, stub.UpdateTask, request)
        ledger.etag_winners[current.etag] += 1
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.ABORTED:
            raise


async def _caller(ledger: Ledger, stub: Any, hot: list[str], seed: int, until: float) -> None:
    rng = random.Random(seed)
    owned: list[pb.Task] = []
    while time.monotonic() < until:
        roll = rng.random()
        try:
            if roll < 0.25 or not owned:
                await _create(ledger, stub, owned)
            elif roll < 0.45:
                await _call(ledger, stub.GetTask, pb.GetTaskRequest(name=rng.choice(owned).name))
            elif roll < 0.55:
                await _call(ledger, stub.ListTasks, pb.ListTasksRequest(page_size=20))
            elif roll < 0.72:
                await _update_own(ledger, stub, owned, rng)
            elif roll < 0.78:
                await _delete_own(ledger, stub, owned, rng)
            elif roll < 0.83:
                await _batch(ledger, stub, owned)
            else:
                await _race(ledger, stub, hot, rng)
        except grpc.aio.AioRpcError:
            pass  # counted by code; the checker decides what matters


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("store", ["sqlite", "firestore"])
async def test_soak_then_reconcile(
    store: str, workers: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """workers=2: TASKSERVICE_WORKERS, two processes on one port (on SQLite,
    two writers of one file)."""
    env = {
        "TASKSERVICE_STORE": store,
        "TASKSERVICE_SQLITE_PATH": str(tmp_path / "t.db"),
        "TASKSERVICE_WORKERS": str(workers),
    }
    if store == "firestore":
        emulator = request.getfixturevalue("emulator")
        env.update(
            FIRESTORE_EMULATOR_HOST=emulator.host,
            GOOGLE_CLOUD_PROJECT=f"demo-soak-{uuid.uuid4().hex[:8]}",
        )
    server = ServerProcess(env, tmp_path)
    # Eight connections, so that SO_REUSEPORT spreads them over the workers.
    channels = [
        grpc.aio.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(8)
    ]
    stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in channels]
    stub = stubs[0]
    try:
        await health_serving(health_pb2_grpc.HealthStub(channels[0]), timeout=30)
        hot = [
            (await stub.CreateTask(create_request("hot", task_id=f"hot-{i}"))).name
            for i in range(HOT_TASKS)
        ]
        rss_start = server.rss_mb()
        ledger = Ledger()
        until = time.monotonic() + SECONDS
        await asyncio.gather(
            *(_caller(ledger, stubs[seed % 8], hot, seed, until) for seed in range(CALLERS))
        )
        rss_end = server.rss_mb()
        stored = {t.name: t for t in await everything(stub)}
    finally:
        for channel in channels:
            await channel.close()
        code, _ = server.stop()

    found = reconcile(ledger, stored, not_the_callers=hot)
    p99 = statistics.quantiles(ledger.latencies, n=100)[98] * 1000
    record(
        f"soak_{store}" + (f"_{workers}_workers" if workers > 1 else ""),
        seconds=SECONDS,
        callers=CALLERS,
        calls=sum(ledger.codes.values()),
        codes=dict(ledger.codes),
        p99_ms=round(p99, 1),
        rss_mb_start=round(rss_start, 1),
        rss_mb_end=round(rss_end, 1),
        acknowledged_creates=len(ledger.acked),
        acknowledged_deletes=len(ledger.deleted),
        etag_races_won=sum(ledger.etag_winners.values()),
        **found.figures(),
        server_exit=code,
    )
    found.assert_none()
    assert set(ledger.codes) <= {"OK", "ABORTED", "NOT_FOUND"}, ledger.codes
    assert ledger.codes["OK"] > 100
    assert code == 0
