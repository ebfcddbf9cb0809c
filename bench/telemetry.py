"""python -m bench.telemetry [--quick]: server CPU per GetTask, telemetry off and on.

One SQLite server process per round, as in production (access lines at INFO),
driven by h2load (64 calls in flight over 16 connections; calls carry no trace
header). Three settings, in rounds that alternate them so the machine's noise
falls on all three alike:
- off: TASKSERVICE_TELEMETRY unset (the default);
- on: TASKSERVICE_TELEMETRY=otlp to a collector on loopback (a receiver in a
  process of its own that accepts and drops), the default sample ratio 0.01,
  metrics every 10 s;
- on, every call traced: the same with TASKSERVICE_TRACE_SAMPLE_RATIO=1.
The figure is the server's own CPU (user + system) per call; the ratio to
"off" is the cost of telemetry. Writes docs/reports/telemetry.json; `python -m
bench.report` renders it into docs/reports/benchmarks.md.
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

from bench.__main__ import ROOT, create_get_target, h2load, start_taskservice
from harness import free_port, wait_for_port

INFLIGHT = 64
CONNECTIONS = 16


def modes(endpoint: str) -> dict[str, dict[str, str]]:
    on = {
        "TASKSERVICE_TELEMETRY": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "TASKSERVICE_METRICS_INTERVAL_SECONDS": "10",
    }
    return {
        "off": {},
        "on": on,
        "on, every call traced": {**on, "TASKSERVICE_TRACE_SAMPLE_RATIO": "1"},
    }


def one_round(workdir: Path, env: dict[str, str], calls: int) -> dict[str, Any]:
    server = start_taskservice("sqlite", workdir, None, extra_env=env)
    try:
        target = create_get_target(server)
        request = pb.GetTaskRequest(name=target.name)
        h2load(server, "GetTask", request, INFLIGHT, calls // 5, connections=CONNECTIONS)  # warm
        result = h2load(
            server,
            "GetTask",
            request,
            INFLIGHT,
            calls,
            response_bytes=5 + target.ByteSize(),
            connections=CONNECTIONS,
        )
        result["rss_mb"] = round(server.rss_mb(), 1)
        return result
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reports"))
    args = parser.parse_args()
    rounds, calls = (2, 10_000) if args.quick else (5, 30_000)
    port = free_port()
    collector = subprocess.Popen(
        [sys.executable, "-m", "harness.otlp", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        assert wait_for_port("127.0.0.1", port, 30), "the collector did not start"
        plan = modes(f"http://127.0.0.1:{port}")
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                for name, env in plan.items():
                    row = one_round(Path(tmp), env, calls)
                    results.setdefault(name, []).append(row)
                    print(
                        f"round {r + 1}/{rounds} {name}: {row['calls_per_s']:,.0f} calls/s,"
                        f" {row['server_cpu_us_per_call']:.0f} µs CPU/call",
                        flush=True,
                    )
    finally:
        collector.terminate()
        collector.wait(10)
    summary: dict[str, Any] = {}
    for name, rows in results.items():
        summary[name] = {
            key: round(statistics.median(r[key] for r in rows), 2)
            for key in ("calls_per_s", "server_cpu_us_per_call", "p50_ms", "p99_ms", "rss_mb")
        }
    off = summary["off"]["server_cpu_us_per_call"]
    for name in summary:
        summary[name]["cpu_vs_off"] = round(summary[name]["server_cpu_us_per_call"] / off, 3)
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": rounds,
        "calls_per_round": calls,
        "inflight": INFLIGHT,
        "connections": CONNECTIONS,
        "modes": summary,
    }
    path = Path(args.out) / "telemetry.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}; python -m bench.report renders it into benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
