"""The backend's own ceiling: the Firestore emulator driven directly by
google-cloud-firestore's AsyncClient (the high-level client), no TaskService.

    python -m bench.firestore_direct OP INFLIGHT SECONDS [--calls N] [--collection NAME]

OP is one of:
- get: reads one document of a 25-document collection of its own;
- set: creates a new document each call;
- list: the query TaskService's ListTasks runs for its default first page of
  20 (taskservice.store.firestore._codec.Collection.query): no filter,
  create_time then the document name, both descending, limit 21 (the page
  and one look-ahead document), on an existing collection of TaskService's
  tasks (--collection, in GOOGLE_CLOUD_PROJECT's database).
It runs for SECONDS, or for N calls in all with --calls. Prints one JSON
line: ops/s, latency percentiles and this process's CPU per op. Expects
FIRESTORE_EMULATOR_HOST and GOOGLE_CLOUD_PROJECT in the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

from google.cloud import firestore

# TaskService's ListTasks reads one document past the page to tell whether
# another page follows.
LIST_PAGE = 20


async def main(
    op: str, inflight: int, seconds: float, calls: int | None, collection_name: str | None
) -> None:
    client = firestore.AsyncClient()
    collection = client.collection(collection_name or f"direct-{op}")
    doc = {
        "title": "Write the runbook",
        "description": "x" * 50,
        "priority": 3,
        "state": 1,
        "assignee": "ana@example.com",
        "tags": ["ops", "docs"],
    }
    if op == "get":
        for i in range(25):
            await collection.document(f"d{i:03d}").set({**doc, "n": i})
    query = (
        collection.order_by("create_time", direction=firestore.Query.DESCENDING)
        .order_by("__name__", direction=firestore.Query.DESCENDING)
        .limit(LIST_PAGE + 1)
    )
    if op == "list":
        got = [d async for d in query.stream()]
        assert len(got) == LIST_PAGE + 1, f"the collection holds only {len(got)} tasks"
    latencies: list[float] = []
    until = time.monotonic() + seconds
    left = iter(range(calls)) if calls is not None else None

    def more() -> bool:
        if left is not None:
            return next(left, None) is not None
        return time.monotonic() < until

    async def worker() -> None:
        while more():
            started = time.perf_counter()
            if op == "get":
                await collection.document("d001").get()
            elif op == "set":
                await collection.document(uuid.uuid4().hex).create(doc)
            else:
                [d async for d in query.stream()]
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
    parser = argparse.ArgumentParser(prog="python -m bench.firestore_direct")
    parser.add_argument("op", choices=("get", "set", "list"))
    parser.add_argument("inflight", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--collection", default=None)
    args = parser.parse_args()
    asyncio.run(main(args.op, args.inflight, args.seconds, args.calls, args.collection))
