"""TaskService benchmarks, all in one run so ratios are fair on a noisy machine.

    python -m bench [--quick] [--out DIR]

Starts everything itself on loopback (the Firestore emulator, an echo server,
TaskService on each store), then measures:
- ceilings: the bare grpc.aio echo server (same options, a Task-sized reply)
  and the emulator driven directly by google-cloud-firestore's AsyncClient;
- TaskService Get/Create/List (h2load, 1/16/64 in flight); Update (each call
  its own task of 1,000, and all on one hot task), Delete and BatchCreateTasks
  (grpc.aio client) on both stores: calls/s, p50/p99, server CPU µs per call
  (/proc), RSS; CreateTask from the same grpc.aio client, for reference;
- on the emulator, ListTasks beside the direct client running the same query
  on the same 10,000-task collection, at the same calls in flight;
- BatchCreateTasks of 10 against single CreateTasks, one call at a time;
- Firestore RPCs and billed documents per call (counted on the store's channel);
- GetTask p99 while 500-task batches commit (does SQLite stall the loop?);
- cold start (launch to SERVING, median of 5) and import time.
Writes benchmarks.json, benchmarks.md and, with matplotlib, benchmarks.png:
a full run into docs/reports/ (the tracked figures), a --quick one into a new
temporary directory, unless --out names the place; it prints each file it
wrote, and no more. Needs h2load (Debian nghttp2-client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from bench.echo import TASK as ECHO_TASK
from harness import (
    CallCounter,
    ServerProcess,
    emulator_jar,
    free_port,
    launch_emulator,
    server_env,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICE = "/tasks.v1.TaskService/"
# TaskService's Firestore collection in the runs (direct_list queries it too).
COLLECTION = "tasks"
# The emulator keeps every document in its heap, and a run leaves some 100,000
# there (the warm-up, the ceilings) before 64 queries over 10,000 tasks each
# sort the whole collection at once: in 512 MB it then spends its time
# collecting garbage, and calls time out.
EMULATOR_HEAP = "2g"


# -- processes ----------------------------------------------------------------


def start_taskservice(
    store: str,
    workdir: Path,
    emulator: str | None,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
    project: str | None = None,
    module: str = "taskservice",
) -> ServerProcess:
    """TaskService as in production: its own process, access lines at INFO,
    telemetry off (the defaults). On Firestore, project names its database
    (a new one unless given). module: what `python -m` runs (a benchmark
    build such as bench._stage_server)."""
    env = {
        "LOG_LEVEL": "INFO",
        "TASKSERVICE_ACCESS_LOG": "on",
        "TASKSERVICE_TELEMETRY": "off",
        "TASKSERVICE_WORKERS": str(workers),
        "TASKSERVICE_STORE": store,
        "TASKSERVICE_SQLITE_PATH": str(workdir / f"bench-{uuid.uuid4().hex[:6]}.db"),
        **(extra_env or {}),
    }
    if store == "firestore":
        assert emulator
        env.update(
            FIRESTORE_EMULATOR_HOST=emulator,
            TASKSERVICE_COLLECTION=COLLECTION,
            GOOGLE_CLOUD_PROJECT=project or f"demo-bench-{uuid.uuid4().hex[:8]}",
        )
    server = ServerProcess(env, workdir, wait=False, keep_output=False, module=module)
    server.wait_serving(30)
    return server


# -- load -----------------------------------------------------------------------


# What the unary runs send. GetTask reads a task the size of the echo's reply;
# every CreateTask creates the same small task (with a new id each time).
GET_TARGET = pb.Task(title="bench get", description="x" * 50, tags=["ops", "docs"])
CREATE = pb.CreateTaskRequest(task=pb.Task(title="created by h2load", tags=["b"]))


def create_get_target(server: ServerProcess, task_id: str = "") -> pb.Task:
    """Creates the task the GetTask runs read."""
    with grpc.insecure_channel(server.target) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        return stub.CreateTask(pb.CreateTaskRequest(task=GET_TARGET, task_id=task_id), timeout=30)


def grpc_frame(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def h2load(
    server: ServerProcess,
    method: str,
    request: Any,
    inflight: int,
    calls: int,
    response_bytes: int | None = None,
    connections: int | None = None,
) -> dict[str, Any]:
    """Unary calls from nghttp2's h2load; latencies from its per-request log.

    h2load counts HTTP statuses, and a failed gRPC call is an HTTP 200 too
    (its status is in the trailers, with no DATA). With response_bytes, the
    framed size of one successful response, the share of calls that got a
    response body is estimated from the DATA bytes received: "grpc_ok"."""
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(grpc_frame(request))
        log = Path(tmp) / "log"
        if connections is None:
            connections = 1 if inflight == 1 else 4
        cpu0 = server.cpu_s()
        started = time.monotonic()
        result = subprocess.run(
            [
                "h2load",
                "-n",
                str(calls),
                "-c",
                str(connections),
                "-m",
                str(inflight // connections),
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-d",
                str(body),
                "--log-file",
                str(log),
                f"http://{server.target}{SERVICE}{method}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        elapsed = time.monotonic() - started
        cpu = server.cpu_s() - cpu0
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)
    data = next(
        (
            int(line.split("(")[-1].split(")")[0])
            for line in result.stdout.splitlines()
            if line.startswith("traffic:")
        ),
        0,
    )
    ok = [int(r[2]) / 1000 for r in rows if r[1] == "200"]
    ok.sort()
    rate = next(
        (
            float(line.split()[3])
            for line in result.stdout.splitlines()
            if line.startswith("finished in")
        ),
        len(ok) / elapsed,
    )
    return {
        "calls": len(rows),
        "http_ok": len(ok),
        "calls_per_s": round(rate, 1),
        "p50_ms": round(ok[len(ok) // 2], 3),
        "p99_ms": round(ok[int(len(ok) * 0.99)], 3),
        "server_cpu_us_per_call": round(cpu / max(len(rows), 1) * 1e6, 1),
        "rss_mb": round(server.rss_mb(), 1),
        **(
            {"grpc_ok": round(min(1.0, data / (response_bytes * max(len(rows), 1))), 3)}
            if response_bytes
            else {}
        ),
    }


async def python_load(
    server: ServerProcess,
    make_call: Any,
    inflight: int,
    calls: int,
    tolerate: tuple[grpc.StatusCode, ...] = (),
) -> dict[str, Any]:
    """Calls from a grpc.aio client (for streams and per-call distinct requests),
    one channel. A call that fails ends the run, unless its code is one of
    tolerate: then it is counted (and timed) like the rest, and the row's
    grpc_ok is the share that succeeded."""
    channel = grpc.aio.insecure_channel(server.target)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    latencies: list[float] = []
    failed = 0
    counter = iter(range(calls))
    cpu0 = server.cpu_s()
    started = time.monotonic()

    async def worker() -> None:
        nonlocal failed
        for i in counter:
            t0 = time.perf_counter()
            try:
                await make_call(stub, i)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in tolerate:
                    raise
                failed += 1
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.monotonic() - started
    cpu = server.cpu_s() - cpu0
    await channel.close()
    latencies.sort()
    return {
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "server_cpu_us_per_call": round(cpu / len(latencies) * 1e6, 1),
        "rss_mb": round(server.rss_mb(), 1),
        **({"grpc_ok": round(1 - failed / len(latencies), 3)} if tolerate else {}),
    }


def _stream(requests: list[pb.CreateTaskRequest]) -> Any:
    async def gen() -> Any:
        for r in requests:
            yield r

    return gen()


def _batch(n: int, prefix: str) -> list[pb.CreateTaskRequest]:
    return [
        pb.CreateTaskRequest(task=pb.Task(title=f"{prefix} {i}", tags=["bench"])) for i in range(n)
    ]


# -- the run --------------------------------------------------------------------


async def small_batches(target: str, pairs: int) -> dict[str, Any]:
    """BatchCreateTasks of 10 against a single CreateTask, one call at a time
    on one grpc.aio channel: pairs of (a stream of 10, one CreateTask), which
    goes first alternating, after 10 pairs unrecorded. Every task, in a batch
    or alone, is the same shape. (The server waits after a stream's
    END_STREAM only for callers on Node's http2; this client pays no wait.)"""
    channel = grpc.aio.insecure_channel(target)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    batch_s: list[float] = []
    single_s: list[float] = []

    async def batch(i: int) -> float:
        t0 = time.perf_counter()
        response = await stub.BatchCreateTasks(_stream(_batch(10, f"ten {i}")), timeout=30)
        elapsed = time.perf_counter() - t0
        assert len(response.tasks) == 10
        return elapsed

    async def single(i: int) -> float:
        request = pb.CreateTaskRequest(task=pb.Task(title=f"one {i}", tags=["bench"]))
        t0 = time.perf_counter()
        await stub.CreateTask(request, timeout=30)
        return time.perf_counter() - t0

    try:
        for i in range(-10, pairs):
            if i % 2:
                b, s = await batch(i), await single(i)
            else:
                s, b = await single(i), await batch(i)
            if i >= 0:
                batch_s.append(b)
                single_s.append(s)
    finally:
        await channel.close()
    batch_s.sort()
    single_s.sort()

    def pct(values: list[float], q: float) -> float:
        return round(values[int(len(values) * q)] * 1000, 3)

    return {
        "pairs": pairs,
        "batch_p50_ms": pct(batch_s, 0.5),
        "batch_p99_ms": pct(batch_s, 0.99),
        "create_p50_ms": pct(single_s, 0.5),
        "create_p99_ms": pct(single_s, 0.99),
        "p50_ratio": round(pct(batch_s, 0.5) / pct(single_s, 0.5), 2),
    }


async def bench_store(
    store: str, workdir: Path, emulator: str | None, quick: bool
) -> dict[str, Any]:
    project = f"demo-bench-{uuid.uuid4().hex[:8]}" if store == "firestore" else None
    server = start_taskservice(store, workdir, emulator, project=project)
    out: dict[str, Any] = {"rpcs": {}}
    n_unary = 1500 if quick else 6000
    n_single = 200 if quick else 600
    try:
        channel = grpc.aio.insecure_channel(server.target)
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        for _ in range(20):  # 10,000 tasks for ListTasks
            await stub.BatchCreateTasks(_stream(_batch(500, "seed")), timeout=120)
        get_task = await asyncio.to_thread(create_get_target, server, "bench-get")
        unary = {
            # First, while the collection holds the 10,000 seeded tasks.
            "ListTasks": pb.ListTasksRequest(page_size=20),
            "GetTask": pb.GetTaskRequest(name=get_task.name),
            "CreateTask": CREATE,
        }
        sizes = {}
        for method, request in unary.items():  # each body must really succeed
            sizes[method] = len(grpc_frame(await getattr(stub, method)(request, timeout=30)))
        if emulator is not None and project is not None:
            # The emulator's JIT has not yet seen a query over 10,000 documents:
            # its first ~50 run several times slower.
            for _ in range(2):
                await asyncio.to_thread(direct_list, emulator, project, 16, 24)
                h2load(server, "ListTasks", unary["ListTasks"], 16, 24)
            out["list_ceiling"] = {}

        def direct(inflight: int, n: int) -> None:
            assert emulator is not None and project is not None
            row = direct_list(emulator, project, inflight, n)
            out["list_ceiling"][inflight] = row
            print(f"  direct firestore list x{inflight}: {row}", flush=True)

        for method, request in unary.items():
            out["rpcs"][method] = {}
            for inflight in (1, 16, 64):
                n = n_single if inflight == 1 else n_unary
                # On the emulator, the direct client's ListTasks query beside
                # TaskService's: the same calls, one right after the other,
                # which goes first alternating with the number in flight.
                beside = method == "ListTasks" and "list_ceiling" in out
                if method == "ListTasks":
                    # The emulator's queries slow down with collection size (a
                    # page over 10,000 documents runs at a few calls/s there).
                    # At 64 in flight it overloads the emulator: one round only.
                    n = n // 3 if store == "sqlite" else {1: 10, 16: 48, 64: 64}[inflight]
                if beside and inflight != 16:
                    await asyncio.to_thread(direct, inflight, n)
                out["rpcs"][method][inflight] = h2load(
                    server, method, request, inflight, n, sizes[method]
                )
                print(
                    f"  {store} {method} x{inflight}: {out['rpcs'][method][inflight]}", flush=True
                )
                if beside and inflight == 16:
                    await asyncio.to_thread(direct, inflight, n)

        # UpdateTask, the usual case: each call updates its own task (1,000
        # tasks in turn, so no two calls in flight touch the same one).
        spread = [
            t.name
            for _ in range(2)
            for t in (await stub.BatchCreateTasks(_stream(_batch(500, "upd")))).tasks
        ]
        hot = (
            await stub.CreateTask(
                pb.CreateTaskRequest(task=pb.Task(title="u"), task_id="bench-upd")
            )
        ).name

        async def update_spread(s: Any, i: int) -> None:
            task = pb.Task(name=spread[i % len(spread)], title=f"v{i}")
            await s.UpdateTask(pb.UpdateTaskRequest(task=task), timeout=30)

        async def update_hot(s: Any, i: int) -> None:
            await s.UpdateTask(
                pb.UpdateTaskRequest(task=pb.Task(name=hot, title=f"v{i}")), timeout=30
            )

        async def create(s: Any, i: int) -> None:
            task = pb.Task(title=f"created by grpc.aio {i}", tags=["b"])
            await s.CreateTask(pb.CreateTaskRequest(task=task), timeout=30)

        for name, call, inflights, tolerate in (
            ("UpdateTask", update_spread, (1, 16, 64), ()),
            # Every call on one task: the callers race for it. A call that
            # keeps losing ends ABORTED (CONCURRENT_MODIFICATION): counted.
            ("UpdateTask (one hot task)", update_hot, (16, 64), (grpc.StatusCode.ABORTED,)),
            # The same client's CreateTask, to read the UpdateTask rows against.
            ("CreateTask (grpc.aio client)", create, (1, 16, 64), ()),
        ):
            out["rpcs"][name] = {}
            for inflight in inflights:
                n = n_single if inflight == 1 else n_unary // (3 if "hot" in name else 1)
                row = await python_load(server, call, inflight, n, tolerate)
                out["rpcs"][name][inflight] = row
                print(f"  {store} {name} x{inflight}: {row}", flush=True)

        out["rpcs"]["DeleteTask"] = {}
        for inflight in (1, 16, 64):
            n = n_single if inflight == 1 else n_unary // 3
            victims = [
                t.name
                for b in range(0, n, 500)
                for t in (
                    await stub.BatchCreateTasks(_stream(_batch(min(500, n - b), "del")))
                ).tasks
            ]

            async def delete(s: Any, i: int, victims: list[str] = victims) -> None:
                await s.DeleteTask(pb.DeleteTaskRequest(name=victims[i]), timeout=30)

            out["rpcs"]["DeleteTask"][inflight] = await python_load(server, delete, inflight, n)
            print(
                f"  {store} DeleteTask x{inflight}: {out['rpcs']['DeleteTask'][inflight]}",
                flush=True,
            )

        out["batch_10_vs_create"] = await small_batches(server.target, 200 if quick else 400)
        print(f"  {store} BatchCreateTasks(10) vs CreateTask: {out['batch_10_vs_create']}")

        batches = []
        for _ in range(3 if quick else 6):
            t0 = time.perf_counter()
            response = await stub.BatchCreateTasks(_stream(_batch(500, "batch")), timeout=120)
            assert len(response.tasks) == 500
            batches.append(500 / (time.perf_counter() - t0))
        out["batch_500_tasks_per_s"] = round(statistics.median(batches), 1)
        print(
            f"  {store} BatchCreateTasks(500): {out['batch_500_tasks_per_s']} tasks/s", flush=True
        )

        async def batch(s: Any, i: int) -> None:
            response = await s.BatchCreateTasks(_stream(_batch(500, f"b{i}")), timeout=120)
            assert len(response.tasks) == 500

        # Streams of 500 at 1, 16 and 64 in flight: calls/s counts streams.
        out["rpcs"]["BatchCreateTasks"] = {}
        for inflight in (1, 16, 64):
            n = {1: 3 if quick else 6, 16: 16 if quick else 32, 64: 64}[inflight]
            row = await python_load(server, batch, inflight, n)
            row["tasks_per_s"] = round(row["calls_per_s"] * 500, 1)
            out["rpcs"]["BatchCreateTasks"][inflight] = row
            print(f"  {store} BatchCreateTasks(500) x{inflight}: {row}", flush=True)

        # GetTask latency while 500-task batches commit: does the store stall the loop?
        quiet = h2load(server, "GetTask", unary["GetTask"], 16, n_unary // 2, sizes["GetTask"])
        busy_stop = asyncio.Event()

        async def batches_forever() -> None:
            while not busy_stop.is_set():
                await stub.BatchCreateTasks(_stream(_batch(500, "busy")), timeout=120)

        busy = asyncio.ensure_future(batches_forever())
        await asyncio.sleep(0.2)
        during = await asyncio.to_thread(
            h2load, server, "GetTask", unary["GetTask"], 16, n_unary // 2, sizes["GetTask"]
        )
        busy_stop.set()
        await busy
        out["get_p99_ms_quiet"] = quiet["p99_ms"]
        out["get_p99_ms_during_batches"] = during["p99_ms"]

        rss_first = server.rss_mb()
        for method, request in unary.items():  # a repeated pass: does memory grow?
            if method != "ListTasks":
                h2load(server, method, request, 64, n_unary)
        await python_load(server, update_spread, 64, n_unary)
        out["rss_mb_after_run"] = round(rss_first, 1)
        out["rss_mb_after_repeat"] = round(server.rss_mb(), 1)
        await channel.close()
    finally:
        server.stop()
    return out


def start_echo(read: bool = False) -> ServerProcess:
    """The echo ceiling; read: GetTask registered as TaskService registers it
    (bench/echo.py --read)."""
    port = free_port()
    args = [str(port), *(["--read"] if read else [])]
    return ServerProcess(port=port, module="bench.echo", args=args, keep_output=False)


def interleaved_ratios(workdir: Path, quick: bool) -> dict[str, Any]:
    """GetTask and CreateTask on SQLite against the echo ceiling, at 16 in
    flight, in alternating rounds (echo, GetTask, CreateTask, echo, ...): this
    machine's speed drifts by ±20% over minutes, so a ratio is only fair
    between runs minutes apart. The targets use the median round's ratio."""
    echo = start_echo()
    server = start_taskservice("sqlite", workdir, None)
    rounds: list[dict[str, float]] = []
    try:
        task = create_get_target(server)
        with grpc.insecure_channel(server.target) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            create_bytes = len(grpc_frame(stub.CreateTask(CREATE, timeout=30)))
        get = pb.GetTaskRequest(name=task.name)
        echo_bytes = len(grpc_frame(ECHO_TASK))
        n = 3000 if quick else 6000
        for _ in range(3 if quick else 5):
            e = h2load(echo, "GetTask", pb.GetTaskRequest(name="tasks/x"), 16, n, echo_bytes)
            g = h2load(server, "GetTask", get, 16, n, len(grpc_frame(task)))
            c = h2load(server, "CreateTask", CREATE, 16, n, create_bytes)
            row = {
                "echo_per_s": e["calls_per_s"],
                "get_per_s": g["calls_per_s"],
                "create_per_s": c["calls_per_s"],
                "get_ratio": round(g["calls_per_s"] / e["calls_per_s"], 3),
                "create_ratio": round(c["calls_per_s"] / e["calls_per_s"], 3),
                "echo_cpu_us": e["server_cpu_us_per_call"],
                "get_cpu_us": g["server_cpu_us_per_call"],
                "grpc_ok": min(e["grpc_ok"], g["grpc_ok"], c["grpc_ok"]),
            }
            rounds.append(row)
            print(f"  interleaved round {len(rounds)}: {row}", flush=True)
    finally:
        server.stop()
        echo.stop()
    return {
        "rounds": rounds,
        "get_ratio": statistics.median(r["get_ratio"] for r in rounds),
        "create_ratio": statistics.median(r["create_ratio"] for r in rounds),
        "cpu_ratio": statistics.median(r["get_cpu_us"] / r["echo_cpu_us"] for r in rounds),
    }


def bench_echo(workdir: Path, quick: bool) -> dict[int, dict[str, Any]]:
    server = start_echo()
    out = {}
    try:
        for inflight in (1, 16, 64):
            n = (200 if quick else 600) if inflight == 1 else (1500 if quick else 6000)
            out[inflight] = h2load(
                server,
                "GetTask",
                pb.GetTaskRequest(name="tasks/x"),
                inflight,
                n,
                len(grpc_frame(ECHO_TASK)),
            )
            print(f"  echo GetTask x{inflight}: {out[inflight]}", flush=True)
    finally:
        server.stop()
    return out


def firestore_direct(emulator: str, project: str, *args: str) -> dict[str, Any]:
    """One run of bench.firestore_direct (a process of its own) with args."""
    env = server_env({"FIRESTORE_EMULATOR_HOST": emulator, "GOOGLE_CLOUD_PROJECT": project})
    result = subprocess.run(
        [sys.executable, "-m", "bench.firestore_direct", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    row: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return row


def bench_direct(
    emulator: str, quick: bool, seconds: str | None = None, record: bool = True
) -> dict[str, Any]:
    """The direct client's get and set at 64 in flight, each on a collection of its own."""
    out = {}
    seconds = seconds or ("4" if quick else "10")
    for op in ("get", "set"):
        out[op] = firestore_direct(emulator, f"demo-direct-{op}", op, "64", seconds)
        if record:
            print(f"  direct firestore {op} x64: {out[op]}", flush=True)
    return out


def direct_list(emulator: str, project: str, inflight: int, calls: int) -> dict[str, Any]:
    """The direct client running TaskService's ListTasks query (first page of 20)
    on TaskService's own collection of tasks in project: calls in all."""
    return firestore_direct(
        emulator,
        project,
        "list",
        str(inflight),
        "0",
        "--calls",
        str(calls),
        "--collection",
        COLLECTION,
    )


def warm_emulator(workdir: Path, emulator: str) -> list[dict[str, float]]:
    """The emulator is a JVM: in its first minute or two under load it runs the
    same calls several times slower (and at several times the CPU per call)
    than once its JIT has compiled them, so whatever is measured first looks
    worse. Drive it with the calls the run compares (TaskService GetTask and
    CreateTask at 64 in flight, the direct client's get and set) in rounds
    until both TaskService rates settle within 10% of the round before. (The
    ListTasks query over 10,000 tasks gets a short warm-up of its own.)"""
    server = start_taskservice("firestore", workdir, emulator)
    rounds: list[dict[str, float]] = []
    try:
        get = pb.GetTaskRequest(name=create_get_target(server).name)
        for _ in range(10):
            t0 = time.monotonic()
            row = {
                "get_per_s": h2load(server, "GetTask", get, 64, 3000)["calls_per_s"],
                "create_per_s": h2load(server, "CreateTask", CREATE, 64, 3000)["calls_per_s"],
            }
            bench_direct(emulator, quick=True, seconds="2", record=False)
            row["seconds"] = round(time.monotonic() - t0, 1)
            rounds.append(row)
            print(f"  warm-up round {len(rounds)}: {row}", flush=True)
            if len(rounds) >= 3 and all(
                abs(row[k] - rounds[-2][k]) <= 0.1 * rounds[-2][k]
                for k in ("get_per_s", "create_per_s")
            ):
                break
    finally:
        server.stop()
    return rounds


async def firestore_costs(emulator: str) -> dict[str, Any]:
    """Firestore RPCs and documents read per TaskService call, on the real channel."""
    from taskservice.config import Config
    from taskservice.runtime.server import TaskServer
    from taskservice.store.firestore import FirestoreStore

    counter = CallCounter()
    store = FirestoreStore(
        grpc.aio.insecure_channel(emulator, interceptors=counter.interceptors()),
        project=f"demo-cost-{uuid.uuid4().hex[:8]}",
        extra_metadata=(("authorization", "Bearer owner"),),
    )
    server = TaskServer(Config(host="127.0.0.1", port=0), store)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    costs: dict[str, Any] = {}

    async def measure(name: str, call: Any) -> Any:
        counter.reset()
        result = await call
        costs[name] = {
            "rpcs": sum(counter.calls.values()),
            "by_method": dict(counter.calls),
            "documents_read": counter.documents,
            "documents_written": counter.written,
        }
        return result

    try:
        wait = time.monotonic() + 30
        while time.monotonic() < wait and not server._probe.done():  # type: ignore[union-attr]
            await asyncio.sleep(0.05)
        await stub.BatchCreateTasks(_stream(_batch(30, "c")))
        task = await measure(
            "CreateTask", stub.CreateTask(pb.CreateTaskRequest(task=pb.Task(title="c")))
        )
        await measure("GetTask", stub.GetTask(pb.GetTaskRequest(name=task.name)))
        task = await measure(
            "UpdateTask",
            stub.UpdateTask(pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="u"))),
        )
        await measure("ListTasks (page of 20)", stub.ListTasks(pb.ListTasksRequest(page_size=20)))
        await measure("DeleteTask", stub.DeleteTask(pb.DeleteTaskRequest(name=task.name)))
        await measure("BatchCreateTasks (500)", stub.BatchCreateTasks(_stream(_batch(500, "b"))))
    finally:
        await channel.close()
        await server.stop(grace=0)
    return costs


def cold_starts(workdir: Path, emulator: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for store in ("sqlite", "firestore"):
        if store == "firestore" and emulator is None:
            continue
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            server = start_taskservice(store, workdir, emulator)
            times.append(time.monotonic() - t0)
            server.stop()
        out[store] = {
            "median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
        }
    for module in ("taskservice.runtime.server", "taskservice.store.firestore"):
        code = f"import time; t=time.perf_counter(); import {module}; print(time.perf_counter()-t)"
        runs = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code],
                    env=server_env(),
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(3)
        ]
        out[f"import {module}"] = {"median_s": round(statistics.median(runs), 3)}
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpus": str(os.cpu_count()),
    }
    for dist in ("grpcio", "protobuf", "google-cloud-firestore"):
        out[dist] = version(dist)
    h2 = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()
    out["h2load"] = h2.split()[-1] if h2 else "?"
    return out


# Wall times measured on the project's 2-core machine, with other work beside
# it (issue 19: --quick took 216 s); the help states them.
QUICK_MINUTES = 4
FULL_MINUTES = 9


def output_dir(quick: bool, out: str | None) -> Path:
    """Where a run writes: --out when given; else docs/reports/ (the tracked figures)
    for a full run, and a new temporary directory for a quick one."""
    if out is not None:
        return Path(out)
    if quick:
        return Path(tempfile.mkdtemp(prefix="taskservice-bench-quick-"))
    return ROOT / "docs" / "reports"


def write_outputs(results: dict[str, Any], out_dir: Path) -> str:
    """Writes the figures and the report; what to tell the user: every file
    written, and why the chart is missing when it is."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The raw figures first, so a failure in the report loses nothing.
    (out_dir / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    from bench.report import write_report

    written = write_report(results, out_dir)
    text = "wrote " + ", ".join(str(p) for p in written)
    if not any(p.suffix == ".png" for p in written):
        text += "\nno chart: matplotlib is not installed (pip install -e '.[bench]')"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"fewer calls: about {QUICK_MINUTES} minutes on a 2-core machine (a full run:"
        f" about {FULL_MINUTES}); writes into a new temporary directory unless --out is given",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where to write benchmarks.md/.json/.png (default: docs/reports/ for a full run,"
        " a new temporary directory for --quick)",
    )
    return parser


async def main() -> int:
    args = build_parser().parse_args()
    if shutil.which("h2load") is None:
        print("bench: h2load not found (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    started = time.monotonic()
    out_dir = output_dir(args.quick, args.out)
    print(f"writing to {out_dir}", flush=True)
    results: dict[str, Any] = {
        "versions": versions(),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    jar = emulator_jar()
    emulator_proc = None
    emulator = None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            if jar is not None:
                port = free_port()
                emulator_proc = launch_emulator(
                    jar, port, workdir / "emulator.log", heap=EMULATOR_HEAP
                )
                assert wait_for_port("127.0.0.1", port, 60)
                emulator = f"127.0.0.1:{port}"
            else:
                print("bench: FIRESTORE SKIPPED: the emulator is not installed", file=sys.stderr)
            print("SQLite against echo, interleaved", flush=True)
            results["sqlite_vs_echo"] = interleaved_ratios(workdir, args.quick)
            print("echo ceiling", flush=True)
            results["echo"] = bench_echo(workdir, args.quick)
            results["stores"] = {}
            print("TaskService on sqlite", flush=True)
            results["stores"]["sqlite"] = await bench_store("sqlite", workdir, None, args.quick)
            if emulator is not None:
                print("warming up the emulator", flush=True)
                results["emulator_warm_up"] = warm_emulator(workdir, emulator)
                # The backend's ceiling, measured on each side of TaskService's
                # run; the report compares against the higher of the two.
                print("Firestore direct-client ceilings, before", flush=True)
                results["firestore_direct_before"] = bench_direct(emulator, args.quick)
                print("TaskService on firestore", flush=True)
                results["stores"]["firestore"] = await bench_store(
                    "firestore", workdir, emulator, args.quick
                )
                print("Firestore direct-client ceilings, after", flush=True)
                results["firestore_direct"] = bench_direct(emulator, args.quick)
                results["firestore_costs"] = await firestore_costs(emulator)
            print("cold start", flush=True)
            results["cold_start"] = cold_starts(workdir, emulator)
        finally:
            if emulator_proc is not None:
                emulator_proc.terminate()
                try:
                    emulator_proc.wait(10)
                except subprocess.TimeoutExpired:
                    emulator_proc.kill()
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    print(write_outputs(results, out_dir))
    print(f"took {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
