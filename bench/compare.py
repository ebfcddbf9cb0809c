"""TaskService at another commit against this checkout, in one run.

    python -m bench.compare REV [--rounds N] [--calls N]

Checks REV out into a temporary git worktree, starts TaskService on SQLite
from it and from this checkout (each its own process, defaults: INFO access
lines, telemetry off) beside the echo, and loads GetTask and CreateTask on
each in alternating rounds with h2load at 16 in flight. Prints the median
calls/s and server CPU per call of each, against the echo's: a before and
after that shares the machine's drift, which figures from two days cannot.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tasks.v1 import task_service_pb2 as pb

from bench.__main__ import CREATE, ROOT, create_get_target, h2load, start_echo, start_taskservice
from harness import ServerProcess

INFLIGHT = 16


def compare(rev: str, rounds: int, calls: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(other), rev],
            check=True,
        )
        servers: dict[str, ServerProcess] = {}
        try:
            servers["echo"] = start_echo()
            # PYTHONPATH: each tree's own taskservice, not the installed one.
            for name, tree in ((rev, other), ("this checkout", ROOT)):
                servers[name] = start_taskservice(
                    "sqlite", Path(tmp), None, extra_env={"PYTHONPATH": str(tree)}
                )
            rows: dict[str, list[dict[str, Any]]] = {}
            for n in range(rounds):
                for name, server in servers.items():
                    if name == "echo":
                        get = pb.GetTaskRequest(name="tasks/x")
                        rows.setdefault("echo", []).append(
                            h2load(server, "GetTask", get, INFLIGHT, calls)
                        )
                        continue
                    get = pb.GetTaskRequest(name=create_get_target(server).name)
                    for method, request in (("GetTask", get), ("CreateTask", CREATE)):
                        rows.setdefault(f"{name} {method}", []).append(
                            h2load(server, method, request, INFLIGHT, calls)
                        )
                print(f"  round {n + 1} of {rounds}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)],
                check=False,
            )
    return {
        name: {
            "calls_per_s": statistics.median(r["calls_per_s"] for r in found),
            "cpu_us_per_call": statistics.median(r["server_cpu_us_per_call"] for r in found),
        }
        for name, found in rows.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare")
    parser.add_argument("rev", help="the commit to compare this checkout with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=8000)
    args = parser.parse_args()
    found = compare(args.rev, args.rounds, args.calls)
    echo = found["echo"]
    for name, f in found.items():
        rate, cpu = f["calls_per_s"], f["cpu_us_per_call"]
        print(
            f"{name:32s} {rate:7.0f} calls/s ({rate / echo['calls_per_s']:4.0%} of echo)"
            f"  {cpu:6.1f} µs/call ({cpu / echo['cpu_us_per_call']:.2f}x echo)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
