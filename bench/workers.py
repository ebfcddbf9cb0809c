"""python -m bench.workers [--quick]: TASKSERVICE_WORKERS=1 against 2, on both
stores, in one run on this machine (the load generator, h2load, and on
Firestore the emulator, share its two cores with the workers).

For each store, rounds alternate 1 worker, 2 workers, 1, 2, ... (the
machine's speed drifts over minutes, so a ratio is only fair between
neighbours), each round a fresh server: GetTask and CreateTask at 64 calls in
flight over 16 connections (SO_REUSEPORT spreads connections, not calls, over
the workers). CPU per call counts every process of the instance. Writes
docs/reports/workers.json; `python -m bench.report` renders it into
docs/reports/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks.v1 import task_service_pb2 as pb

from bench.__main__ import CREATE, ROOT, create_get_target, h2load, start_taskservice, warm_emulator
from harness import emulator_jar, free_port, launch_emulator, wait_for_port

INFLIGHT = 64
CONNECTIONS = 16


def one_round(
    store: str, workers: int, workdir: Path, emulator: str | None, calls: int
) -> dict[str, Any]:
    server = start_taskservice(store, workdir, emulator, workers=workers)
    try:
        target = create_get_target(server)
        get = h2load(
            server,
            "GetTask",
            pb.GetTaskRequest(name=target.name),
            INFLIGHT,
            calls,
            response_bytes=5 + target.ByteSize(),
            connections=CONNECTIONS,
        )
        create = h2load(server, "CreateTask", CREATE, INFLIGHT, calls // 2, connections=CONNECTIONS)
        return {"GetTask": get, "CreateTask": create, "rss_mb": round(server.rss_mb(), 1)}
    finally:
        server.stop()


def median_of(rounds: list[dict[str, Any]], method: str, key: str) -> float:
    return round(statistics.median(r[method][key] for r in rounds), 1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "docs" / "reports"))
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 4)
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "inflight": INFLIGHT,
        "connections": CONNECTIONS,
        "stores": {},
    }
    jar = emulator_jar()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        emulator_proc = None
        try:
            plans: list[tuple[str, str | None, int]] = [
                ("sqlite", None, 6000 if args.quick else 15000)
            ]
            if jar is not None:
                port = free_port()
                emulator_proc = launch_emulator(jar, port, workdir / "emulator.log")
                assert wait_for_port("127.0.0.1", port, 60)
                emulator = f"127.0.0.1:{port}"
                print("warming up the emulator", flush=True)
                warm_emulator(workdir, emulator)
                plans.append(("firestore", emulator, 3000 if args.quick else 6000))
            for store, emulator_host, calls in plans:
                by_workers: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
                for n in range(rounds):
                    for workers in (1, 2):
                        print(f"{store}: round {n + 1}, {workers} worker(s)", flush=True)
                        by_workers[workers].append(
                            one_round(store, workers, workdir, emulator_host, calls)
                        )
                summary: dict[str, Any] = {}
                for workers, runs in by_workers.items():
                    summary[str(workers)] = {
                        method: {
                            "calls_per_s": median_of(runs, method, "calls_per_s"),
                            "server_cpu_us_per_call": median_of(
                                runs, method, "server_cpu_us_per_call"
                            ),
                            "p50_ms": median_of(runs, method, "p50_ms"),
                            "p99_ms": median_of(runs, method, "p99_ms"),
                        }
                        for method in ("GetTask", "CreateTask")
                    }
                    summary[str(workers)]["rss_mb"] = statistics.median(r["rss_mb"] for r in runs)
                summary["rounds"] = {str(k): v for k, v in by_workers.items()}
                out["stores"][store] = summary
        finally:
            if emulator_proc is not None:
                emulator_proc.terminate()
                try:
                    emulator_proc.wait(10)
                except subprocess.TimeoutExpired:
                    emulator_proc.kill()
    path = Path(args.out) / "workers.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(
        json.dumps(
            {s: {w: v for w, v in d.items() if w != "rounds"} for s, d in out["stores"].items()},
            indent=1,
        )
    )
    print(f"wrote {path}; python -m bench.report renders it into benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
