"""The backend's own ceiling: the Firestore emulator driven directly by
google-cloud-firestore's AsyncClient (the high-level client), no TaskService.

    python -m bench.firestore_direct OP INFLIGHT SECONDS   (OP: get | set | query20)

Prints one JSON line: ops/s, latency percentiles and this process's CPU per op.
Expects FIRESTORE_EMULATOR_HOST and GOOGLE_CLOUD_PROJECT in the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

from google.cloud import firestore


async def main(op: str, inflight: int, seconds: float) -> None:
    client = firestore.AsyncClient()
    collection = client.collection(f"direct-{op}")
    doc = {
        "title": "Write the runbook",
        "description": "x" * 50,
        "priority": 3,
        "state": 1,
        "assignee": "ana@example.com",
        "tags": ["ops", "docs"],
    }
    if op in ("get", "query20"):
        for i in range(25):
            await collection.document(f"d{i:03d}").set({**doc, "n": i})
    latencies: list[float] = []
    until = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < until:
            started = time.perf_counter()
            if op == "get":
                await collection.document("d001").get()
            elif op == "set":
                await collection.document(uuid.uuid4().hex).create(doc)
            else:
                [d async for d in collection.order_by("n").limit(20).stream()]
            latencies.append(time.perf_counter() - started)

    cpu0 = os.times()
    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.monotonic() - t0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    latencies.sort()
    print(
        json.dumps(
            {
                "op": op,
                "inflight": inflight,
                "calls": len(latencies),
                "calls_per_s": len(latencies) / elapsed,
                "p50_ms": latencies[len(latencies) // 2] * 1000,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
                "client_cpu_us_per_op": cpu / len(latencies) * 1e6,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
