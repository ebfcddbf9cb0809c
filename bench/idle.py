"""python -m bench.idle [--idle SECONDS]: what an instance does after its last call.

One SQLite server process as deployed (access lines at INFO, telemetry on,
metrics exported every 60 s, the default), to an OTLP receiver on loopback.
It serves a short burst of calls, then nothing: the figures are what happens
with no request in flight, which is what Cloud Run's request-only CPU would
stall (deploy/service.yaml keeps CPU allocated instead):
- the metric exports that arrive while idle, and how long after the last
  response the first one comes (the last calls' metrics are in it);
- the CPU the process uses while idle (user + system), in total and per
  export: what the always-allocated CPU is actually used for.
Writes docs/reports/idle.json; scripts/capacity_report.py uses it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import grpc
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from bench.__main__ import ROOT, start_taskservice
from harness.otlp import start_receiver

BURST = 200


async def measure(idle_seconds: float) -> dict[str, object]:
    receiver = await start_receiver()
    with tempfile.TemporaryDirectory() as workdir:
        server = await asyncio.to_thread(
            start_taskservice,
            "sqlite",
            Path(workdir),
            None,
            1,
            {
                "TASKSERVICE_TELEMETRY": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "TASKSERVICE_METRICS_INTERVAL_SECONDS": "60",
            },
        )
        try:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = task_service_pb2_grpc.TaskServiceStub(channel)
                task = await stub.CreateTask(pb.CreateTaskRequest(task=pb.Task(title="idle")))
                for _ in range(BURST):
                    await stub.GetTask(pb.GetTaskRequest(name=task.name))
                last_response = time.monotonic()
                exports_before = len(receiver.metrics)
                await asyncio.sleep(0.5)  # the burst's own after-response work
                cpu_start = server.cpu_s()
                idle_from = time.monotonic()
                arrivals: list[float] = []
                while time.monotonic() - idle_from < idle_seconds:
                    await asyncio.sleep(0.1)
                    while exports_before + len(arrivals) < len(receiver.metrics):
                        arrivals.append(time.monotonic() - last_response)
                cpu_ms = (server.cpu_s() - cpu_start) * 1000
        finally:
            await asyncio.to_thread(server.stop)
            assert receiver.server is not None
            await receiver.server.stop(0)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "metrics_interval_seconds": 60,
        "burst_calls": BURST + 1,
        "idle_seconds": idle_seconds,
        "exports_while_idle": len(arrivals),
        "first_export_after_last_response_s": round(arrivals[0], 1) if arrivals else None,
        "cpu_ms_while_idle": round(cpu_ms, 1),
        "cpu_ms_per_idle_minute": round(cpu_ms / (idle_seconds / 60), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle")
    parser.add_argument("--idle", type=float, default=150.0, help="seconds of idling measured")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reports" / "idle.json")
    args = parser.parse_args()
    result = asyncio.run(measure(args.idle))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
