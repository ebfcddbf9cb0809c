"""Where a call's server CPU goes, stage by stage: TaskService on SQLite with
one stage at a time switched off (bench._stage_server), against the bare
grpc.aio echo, in alternating rounds.

    python -m bench.stages [--rounds N] [--calls N] [--out docs/reports]

Every server runs at once; each round loads each of them in turn with h2load
(16 calls in flight over 4 connections, as the benchmark's interleaved
rounds), and a figure is the median over rounds of the server's CPU per call
(every thread of its process). A stage's cost is the difference between two
builds that differ by that stage alone:

    access line          full - access line off
    call pipeline        access line off - pipeline off (and access line off)
    request idle timer   full - timer off
    servicer             full - servicer answering a prebuilt Task
    store                full - store answering from memory
    SQLite query         full - the row taken from memory (GetTask)
    validation+convert   store off - servicer off
    durability (fsync)   full - commits without fsync (CreateTask)

The echo answers the same Task unchanged, decoded and encoded by gRPC: what
is left of the servicer-off build beyond the echo is the generated
registration's own cost. Encoding and decoding are timed in-process too
(timeit), since no build can do without them. Writes OUT/stages.json; the
benchmark report (bench.report) renders it in benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from tasks.v1 import task_service_pb2 as pb

from bench.__main__ import CREATE, ROOT, create_get_target, h2load, start_echo, start_taskservice
from bench.echo import TASK as ECHO_TASK
from harness import ServerProcess

INFLIGHT = 16
# name: (method, BENCH_STAGES_OFF, TASKSERVICE_ACCESS_LOG)
BUILDS: dict[str, tuple[str, str, str]] = {
    "GetTask full": ("GetTask", "", "on"),
    "GetTask access line off": ("GetTask", "", "off"),
    "GetTask pipeline off": ("GetTask", "pipeline", "off"),
    "GetTask timer off": ("GetTask", "timer", "on"),
    "GetTask servicer off": ("GetTask", "servicer", "on"),
    "GetTask store off": ("GetTask", "store", "on"),
    "GetTask SQLite query off": ("GetTask", "sqlread", "on"),
    "CreateTask full": ("CreateTask", "", "on"),
    "CreateTask access line off": ("CreateTask", "", "off"),
    "CreateTask pipeline off": ("CreateTask", "pipeline", "off"),
    "CreateTask servicer off": ("CreateTask", "servicer", "on"),
    "CreateTask store off": ("CreateTask", "store", "on"),
    "CreateTask no fsync": ("CreateTask", "nosync", "on"),
}
# stage: (build with it, build without it)
STAGES: list[tuple[str, str, str]] = [
    ("access line", "full", "access line off"),
    ("call pipeline (trace, request read, admission, record)", "access line off", "pipeline off"),
    ("request idle timer (part of the pipeline)", "full", "timer off"),
    ("servicer (validation, conversion, store)", "full", "servicer off"),
    ("store", "full", "store off"),
    ("SQLite query (execute and fetch; part of the store)", "full", "SQLite query off"),
    ("validation and conversion", "store off", "servicer off"),
    ("durability: fsync per group commit", "full", "no fsync"),
]


def in_process() -> dict[str, float]:
    """µs per decode or encode of the messages these calls carry (protobuf's C
    implementation), measured with timeit."""
    get = pb.GetTaskRequest(name="tasks/0b6c1e9a3f1e4a559d7e2f3c8f1f0a11").SerializeToString()
    create = CREATE.SerializeToString()
    n = 100_000
    cases = {
        "decode GetTaskRequest": lambda: pb.GetTaskRequest.FromString(get),
        "decode CreateTaskRequest": lambda: pb.CreateTaskRequest.FromString(create),
        "encode Task": ECHO_TASK.SerializeToString,
    }
    return {name: round(timeit.timeit(f, number=n) / n * 1e6, 2) for name, f in cases.items()}


def measure(rounds: int, calls: int) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        servers: dict[str, ServerProcess] = {}
        requests: dict[str, tuple[str, Any]] = {}
        try:
            for name, read in (("echo", False), ("echo reading its message", True)):
                servers[name] = start_echo(read)
                requests[name] = ("GetTask", pb.GetTaskRequest(name="tasks/x"))
            for name, (method, off, access) in BUILDS.items():
                server = servers[name] = start_taskservice(
                    "sqlite",
                    workdir,
                    None,
                    extra_env={"TASKSERVICE_ACCESS_LOG": access, "BENCH_STAGES_OFF": off},
                    module="bench._stage_server",
                )
                if method == "GetTask":
                    task = create_get_target(server)
                    requests[name] = (method, pb.GetTaskRequest(name=task.name))
                else:
                    requests[name] = (method, CREATE)
            for n in range(rounds):
                for name, server in servers.items():
                    method, request = requests[name]
                    rows.setdefault(name, []).append(
                        h2load(server, method, request, INFLIGHT, calls)
                    )
                print(
                    f"  round {n + 1}: "
                    + ", ".join(f"{k} {v[-1]['server_cpu_us_per_call']}" for k, v in rows.items()),
                    flush=True,
                )
        finally:
            for server in servers.values():
                server.stop()
    builds = {
        name: {
            "cpu_us_per_call": statistics.median(r["server_cpu_us_per_call"] for r in found),
            "calls_per_s": statistics.median(r["calls_per_s"] for r in found),
            "rounds_cpu_us": [r["server_cpu_us_per_call"] for r in found],
        }
        for name, found in rows.items()
    }
    stages: dict[str, dict[str, float]] = {}
    for method in ("GetTask", "CreateTask"):
        for stage, with_it, without in STAGES:
            a, b = builds.get(f"{method} {with_it}"), builds.get(f"{method} {without}")
            if a is None or b is None:
                continue
            stages.setdefault(method, {})[stage] = round(
                a["cpu_us_per_call"] - b["cpu_us_per_call"], 1
            )
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": rounds,
        "calls_per_round": calls,
        "inflight": INFLIGHT,
        "builds": builds,
        "stages": stages,
        "in_process_us": in_process(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=6000)
    parser.add_argument("--out", default=str(ROOT / "docs" / "reports"))
    args = parser.parse_args()
    found = measure(args.rounds, args.calls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.json").write_text(json.dumps(found, indent=1) + "\n")
    echo = found["builds"]["echo"]["cpu_us_per_call"]
    for name, b in found["builds"].items():
        cpu = b["cpu_us_per_call"]
        print(f"{name:34s} {cpu:7.1f} µs/call {cpu / echo:5.2f}x echo")
    for method, stages in found["stages"].items():
        for stage, us in stages.items():
            print(f"{method} {stage}: {us} µs")
    print(f"wrote {out / 'stages.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
