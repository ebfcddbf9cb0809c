"""python -m bench.watch [--quick]: WatchTasks on both stores, in one run.

For each store, a fresh server process (as in production, access lines at
INFO) and, on the same machine, the watchers and writers:
- commit-to-event latency with 1 and with 100 watchers: one writer updates 20
  tasks one at a time; latency is an event's arrival (the watcher's clock)
  minus the task's update_time (the store's clock: the same machine's);
- events/s per instance: 100 watchers while 8 writers update as fast as
  they can, events delivered to all watchers per second, and the server's
  CPU per event;
- memory: server RSS with 1,000 idle watchers (10 channels of 100 streams),
  per watcher; and with 10 watchers that read nothing (64 KiB windows)
  while 1,500 updates of 2 KB tasks go by (more than the 1,000 events a
  stream may fall behind): RSS before, at its peak and after, and how those
  watchers ended.
The watchers' client runs in this one Python process, so with 100 watchers
part of the latency is the client's own. On the emulator the store reads
each Listen snapshot again at its read time (the emulator's snapshots lag
their read times; see taskservice.store.firestore._hub): one RunQuery per
snapshot that production does not pay. Writes docs/reports/watch.json; `python -m
bench.report` renders it into docs/reports/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from bench.__main__ import ROOT, start_taskservice, warm_emulator
from harness import ServerProcess, emulator_jar, free_port, launch_emulator, wait_for_port

TASKS = 20
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


class Watchers:
    """n WatchTasks streams over channels of at most 100 streams, each read
    in the background (or not at all: read=False)."""

    def __init__(self, target: str, n: int, *, read: bool = True, options: Any = None) -> None:
        # A connection of its own per channel (gRPC would otherwise share one
        # between channels of the same target and options, and the server
        # allows 256 streams on a connection: the rest would wait for a slot).
        self.channels = [
            grpc.aio.insecure_channel(
                target, options=[*(options or []), ("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(max(1, (n + 99) // 100))
        ]
        stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in self.channels]
        self.calls = [stubs[i // 100].WatchTasks(pb.WatchTasksRequest()) for i in range(n)]
        self.latencies_ms: list[float] = []
        self.events = 0
        self.endings: dict[str, int] = {}
        self.read = read
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        async with asyncio.timeout(120):
            for call in self.calls:  # each stream's first event: CURRENT
                assert (await call.read()).type == pb.WatchTasksResponse.TYPE_CURRENT
        if self.read:
            self._tasks = [asyncio.create_task(self._follow(c)) for c in self.calls]

    async def _follow(self, call: Any) -> None:
        try:
            while (event := await call.read()) is not grpc.aio.EOF:
                if event.type == pb.WatchTasksResponse.TYPE_MODIFIED:
                    arrived = time.time_ns()
                    self.latencies_ms.append((arrived - event.commit_time.ToNanoseconds()) / 1e6)
                    self.events += 1
        except grpc.aio.AioRpcError as err:
            self.endings[err.code().name] = self.endings.get(err.code().name, 0) + 1

    async def endings_of_unread(self, timeout: float = 10) -> dict[str, int]:
        """How the streams that were never read ended (reading them now)."""
        for call in self.calls:
            try:
                async with asyncio.timeout(timeout):
                    while await call.read() is not grpc.aio.EOF:
                        pass
            except grpc.aio.AioRpcError as err:
                details = err.details() or ""
                key = f"{err.code().name} ({'WATCHER_TOO_SLOW' if 'behind' in details else '?'})"
                self.endings[key] = self.endings.get(key, 0) + 1
            except TimeoutError:
                self.endings["still open"] = self.endings.get("still open", 0) + 1
        return self.endings

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            await channel.close()


async def _tasks(stub: Any, description: str = "") -> list[str]:
    names = []
    for i in range(TASKS):
        task = await stub.CreateTask(
            pb.CreateTaskRequest(task=pb.Task(title=f"watched {i}", description=description))
        )
        names.append(task.name)
    return names


async def _update(stub: Any, name: str, title: str) -> bool:
    try:
        await stub.UpdateTask(
            pb.UpdateTaskRequest(
                task=pb.Task(name=name, title=title),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            timeout=30,
        )
        return True
    except grpc.aio.AioRpcError:
        return False  # contention on the emulator: not counted


async def latency(server: ServerProcess, watchers: int, updates: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        names = await _tasks(stub)
        watch = Watchers(server.target, watchers)
        await watch.start()
        written = 0
        for i in range(updates):
            written += await _update(stub, names[i % TASKS], f"v{i}")
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + 30
        while watch.events < written * watchers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await watch.close()
    lat = watch.latencies_ms
    return {
        "watchers": watchers,
        "updates": written,
        "events": len(lat),
        "p50_ms": _pct(lat, 0.5),
        "p99_ms": _pct(lat, 0.99),
        "max_ms": round(max(lat), 2),
    }


async def throughput(server: ServerProcess, watchers: int, seconds: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        names = await _tasks(stub)
        watch = Watchers(server.target, watchers)
        await watch.start()
        stop = time.monotonic() + seconds
        written = 0

        async def writer(n: int) -> None:
            nonlocal written
            i = 0
            while time.monotonic() < stop:
                ok = await _update(stub, names[(n * 7 + i) % TASKS], f"w{n}-{i}")
                written += ok  # after the await: `written += await ...` would lose counts
                i += 1

        cpu0, events0, started = server.cpu_s(), watch.events, time.monotonic()
        await asyncio.gather(*(writer(n) for n in range(8)))
        await asyncio.sleep(1.0)  # let the last events arrive
        took = time.monotonic() - started
        delivered = watch.events - events0
        cpu = server.cpu_s() - cpu0
        await watch.close()
    return {
        "watchers": watchers,
        "writes_per_s": round(written / seconds, 1),
        "events_per_s": round(delivered / took, 1),
        "server_cpu_us_per_event": round(cpu / max(delivered, 1) * 1e6, 1),
        "endings": watch.endings,
    }


async def idle_memory(server: ServerProcess, watchers: int) -> dict[str, Any]:
    await asyncio.sleep(0.5)
    before = server.rss_mb()
    watch = Watchers(server.target, watchers, read=False)
    opened = time.monotonic()
    await watch.start()
    opened_s = time.monotonic() - opened
    await asyncio.sleep(2.0)
    after = server.rss_mb()
    await watch.close()
    return {
        "watchers": watchers,
        "rss_before_mb": round(before, 1),
        "rss_with_watchers_mb": round(after, 1),
        "kb_per_watcher": round((after - before) * 1024 / watchers, 1),
        "open_all_s": round(opened_s, 2),
    }


async def unread_memory(server: ServerProcess, watchers: int, updates: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        names = await _tasks(stub, description="d" * 2000)
        watch = Watchers(server.target, watchers, read=False, options=SMALL_WINDOW)
        await watch.start()
        before = server.rss_mb()
        peak = before
        for i in range(updates):
            await _update(stub, names[i % TASKS], f"u{i}")
            if i % 50 == 0:
                peak = max(peak, server.rss_mb())
        await asyncio.sleep(1.0)
        after = server.rss_mb()
        endings = await watch.endings_of_unread()
        await watch.close()
    return {
        "watchers": watchers,
        "updates": updates,
        "event_bytes": 2100,
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(max(peak, after), 1),
        "rss_after_mb": round(after, 1),
        "endings": endings,
    }


async def measure(server: ServerProcess, quick: bool) -> dict[str, Any]:
    updates = 100 if quick else 200
    out: dict[str, Any] = {"latency": []}
    for watchers in (1, 100):
        out["latency"].append(await latency(server, watchers, updates))
        print(f"  latency, {watchers} watchers: {out['latency'][-1]}", flush=True)
    out["throughput"] = await throughput(server, 100, 3 if quick else 6)
    print(f"  throughput: {out['throughput']}", flush=True)
    out["idle"] = await idle_memory(server, 1000)
    print(f"  idle: {out['idle']}", flush=True)
    # More updates than a stream may fall behind (TASKSERVICE_WATCH_BUFFER, 1000):
    # the unread watchers must be ended, and memory must stop growing.
    out["unread"] = await unread_memory(server, 10, 1500)
    print(f"  unread: {out['unread']}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watch")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reports"))
    parser.add_argument("--stores", default="sqlite,firestore")
    args = parser.parse_args()
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stores": {}}
    jar = emulator_jar()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        emulator_proc = None
        try:
            stores = args.stores.split(",")
            plans: list[tuple[str, str | None]] = [("sqlite", None)] if "sqlite" in stores else []
            if jar is not None and "firestore" in stores:
                port = free_port()
                emulator_proc = launch_emulator(jar, port, workdir / "emulator.log")
                assert wait_for_port("127.0.0.1", port, 60)
                emulator = f"127.0.0.1:{port}"
                print("warming up the emulator", flush=True)
                warm_emulator(workdir, emulator)
                plans.append(("firestore", emulator))
            else:
                print("the Firestore emulator is missing: SQLite only", file=sys.stderr)
            for store, emulator_host in plans:
                print(f"{store}: WatchTasks", flush=True)
                server = start_taskservice(store, workdir, emulator_host)
                try:
                    out["stores"][store] = asyncio.run(measure(server, args.quick))
                finally:
                    server.stop()
                print(json.dumps(out["stores"][store], indent=1), flush=True)
        finally:
            if emulator_proc is not None:
                emulator_proc.terminate()
                try:
                    emulator_proc.wait(10)
                except subprocess.TimeoutExpired:
                    emulator_proc.kill()
    path = Path(args.out) / "watch.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}; python -m bench.report renders it into benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
