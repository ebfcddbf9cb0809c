"""TASKSERVICE_WORKERS: several server processes on one port, supervised, as an
operator runs them (`python -m taskservice` in its own process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import ServerProcess, free_port, server_env, wait_for_port
from harness.servers import children
from taskservice.config import available_cpus
from tests.helpers import create_request
from tests.reliability import record

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        {"TASKSERVICE_WORKERS": "2", "TASKSERVICE_SQLITE_PATH": str(tmp_path / "t.db")},
        tmp_path,
    )
    server.wait_serving()
    yield server
    workers = children(server.proc.pid)  # before the kill: then they are init's
    server.kill()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def _status(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
        return int(response.status)


async def test_both_workers_take_calls(two_workers: ServerProcess) -> None:
    workers = children(two_workers.proc.pid)
    assert len(workers) == 2
    before = {pid: cpu_seconds(pid) for pid in workers}
    channels = [
        grpc.aio.insecure_channel(
            two_workers.target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(16)
    ]
    try:
        stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in channels]
        task = await stubs[0].CreateTask(create_request("shared"))
        for _ in range(40):
            await asyncio.gather(*(s.GetTask(pb.GetTaskRequest(name=task.name)) for s in stubs))
    finally:
        for c in channels:
            await c.close()
    used = {pid: cpu_seconds(pid) - before[pid] for pid in workers}
    record("workers_share_the_port", workers=2, connections=16, cpu_s=used)
    assert all(seconds > 0.05 for seconds in used.values()), used


async def test_sigterm_drains_every_worker_and_exits_0(two_workers: ServerProcess) -> None:
    channel = grpc.aio.insecure_channel(two_workers.target)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    sent = asyncio.Event()

    async def slow() -> AsyncIterator[pb.CreateTaskRequest]:
        for i in range(10):
            yield create_request(f"t{i}")
            if i == 2:
                sent.set()
            await asyncio.sleep(0.1)

    try:
        batch = asyncio.ensure_future(stub.BatchCreateTasks(slow(), timeout=10))
        await sent.wait()
        started = time.monotonic()
        two_workers.signal(signal.SIGTERM)
        assert len((await batch).tasks) == 10  # in flight at SIGTERM: finished
        code, output = await asyncio.to_thread(two_workers.finish, 15)
        took = time.monotonic() - started
    finally:
        await channel.close()
    assert code == 0, output[-2000:]
    assert took < 9
    assert children(two_workers.proc.pid) == []


async def test_a_dead_worker_is_started_again_and_health_waits_for_it(
    two_workers: ServerProcess,
) -> None:
    first = children(two_workers.proc.pid)
    os.kill(first[0], signal.SIGKILL)
    started = time.monotonic()
    statuses: list[tuple[float, int]] = []
    while time.monotonic() - started < 10:
        try:
            status = await _status(two_workers.target)
        except grpc.aio.AioRpcError:
            status = -1  # the dead worker's connections are gone
        statuses.append((time.monotonic() - started, status))
        seen = [s for _, s in statuses]
        if status == SERVING and NOT_SERVING in seen:
            break
        await asyncio.sleep(0.05)
    now = children(two_workers.proc.pid)
    seen = [s for _, s in statuses]
    # Until the supervisor notices the death (it reaps its children), the
    # survivor still answers SERVING: that window is short. From then on
    # health says NOT_SERVING until the new worker is ready, then SERVING.
    # (A call that met the dead worker's connection fails: -1, not a status.)
    assert NOT_SERVING in seen, statuses[:40]
    first_down = seen.index(NOT_SERVING)
    noticed_after = statuses[first_down][0]
    back = statuses[-1][0]
    record(
        "worker_restart",
        death_noticed_after_s=round(noticed_after, 2),
        serving_again_after_s=round(back, 2),
    )
    assert noticed_after < 1.5, statuses[:20]
    assert seen[-1] == SERVING and SERVING not in seen[first_down:-1], statuses[:40]
    assert len(now) == 2 and first[0] not in now
    assert "worker 0 exited" in two_workers.output or "worker 1 exited" in two_workers.output


async def test_a_crash_loop_stops_the_instance_with_exit_1(two_workers: ServerProcess) -> None:
    killed = 0
    deadline = time.monotonic() + 40
    while two_workers.proc.poll() is None and time.monotonic() < deadline:
        for pid in children(two_workers.proc.pid):
            os.kill(pid, signal.SIGKILL)
            killed += 1
        await asyncio.sleep(0.3)
    code, output = await asyncio.to_thread(two_workers.finish, 15)
    assert code == 1, output[-2000:]
    assert "workers keep dying" in output
    assert killed >= 5


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskservice"],
        env=server_env({"TASKSERVICE_WORKERS": "2", "PORT": "0"}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "needs a fixed PORT" in result.stderr


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_auto_counts_the_cgroup_quota_not_the_host(
    tmp_path: Path, files: dict[str, str], cpus: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    allowed = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (allowed if cpus is None else min(cpus, allowed))


def test_a_busy_port_is_one_line_with_workers(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "taskservice", "--port", str(port)],
            env=server_env({"TASKSERVICE_WORKERS": "2"}),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "already in use" in result.stderr


async def test_the_workers_log_lines_never_interleave(tmp_path: Path) -> None:
    """Two workers write access lines to one stderr pipe, as Cloud Run reads a
    container's output: every line must stay whole (a write of more than
    PIPE_BUF bytes to a pipe is not atomic)."""
    port = free_port()
    env = server_env(
        {
            "PORT": str(port),
            "TASKSERVICE_HOST": "127.0.0.1",
            "TASKSERVICE_WORKERS": "2",
            "LOG_LEVEL": "INFO",
            "TASKSERVICE_SQLITE_PATH": str(tmp_path / "t.db"),
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskservice"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    collected: list[bytes] = []

    def read_slowly() -> None:
        """A slow reader, as a busy log agent may be: the pipe fills up, and
        then a large write goes in piece by piece."""
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(2048):  # type: ignore[attr-defined]
            collected.append(chunk)
            time.sleep(0.01)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(16)
    ]
    try:
        assert await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 30)
        stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in channels]
        task = await stubs[0].CreateTask(create_request("logged"), wait_for_ready=True, timeout=30)
        for _ in range(150):
            await asyncio.gather(*(s.GetTask(pb.GetTaskRequest(name=task.name)) for s in stubs))
    finally:
        for c in channels:
            await c.close()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
        reader.join(15)
    assert code == 0
    lines = b"".join(collected).decode(errors="replace").splitlines()
    broken = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            broken.append(line[:160])
    access = [line for line in lines if "tasks.v1.TaskService/GetTask" in line]
    record("workers_log_lines", lines=len(lines), broken=len(broken), access_lines=len(access))
    assert not broken, broken[:3]
    assert len(access) == 150 * 16


def _tcp_sockets() -> dict[tuple[int, int], int]:
    """Every TCP socket of this network namespace: (local port, remote port)
    to its inode."""
    found: dict[tuple[int, int], int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
            found[(local, remote)] = int(fields[9])
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


async def test_events_reach_watchers_on_the_other_worker_within_50_ms(
    two_workers: ServerProcess,
) -> None:
    """README: a commit reaches the other worker's watchers within 50 ms.
    A watcher on each of 16 connections, each connection's worker found from
    /proc; 150 creates at random spacing through all of them. For each
    create and each watcher on the other worker: how much later than the
    first watcher on the writer's own worker (woken at once) it got the
    event. That is the other worker's poll wait; subtracting the writer's
    worker's delivery takes out what a busy machine delays for both. With a
    50 ms poll it was uniform over 0-50 ms (issue 21: 7% of events past
    50 ms, at most 65 ms)."""
    import random
    import statistics

    events = 150
    server_port = two_workers.port
    workers = children(two_workers.proc.pid)
    assert len(workers) == 2
    channels: list[grpc.aio.Channel] = []
    worker_of: list[int] = []  # each channel's worker pid
    arrivals: dict[str, dict[int, float]] = {}
    readers: list[asyncio.Task[None]] = []
    try:
        mine = _socket_inodes(os.getpid())
        seen_ports: set[int] = set()
        for _ in range(16):
            channel = grpc.aio.insecure_channel(
                two_workers.target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            await asyncio.wait_for(channel.channel_ready(), 5)
            mine = _socket_inodes(os.getpid())
            sockets = _tcp_sockets()
            ports = {
                local
                for (local, remote), inode in sockets.items()
                if remote == server_port and inode in mine
            } - seen_ports
            assert len(ports) == 1, ports
            port = ports.pop()
            seen_ports.add(port)
            inode = sockets[(server_port, port)]
            (pid,) = [w for w in workers if inode in _socket_inodes(w)]
            channels.append(channel)
            worker_of.append(pid)
        assert set(worker_of) == set(workers), worker_of  # both have watchers
        stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in channels]
        ready = [asyncio.Event() for _ in stubs]

        async def watch(index: int) -> None:
            async for event in stubs[index].WatchTasks(pb.WatchTasksRequest()):
                if event.type == pb.WatchTasksResponse.TYPE_CURRENT:
                    ready[index].set()
                elif event.type == pb.WatchTasksResponse.TYPE_ADDED:
                    arrivals.setdefault(event.name, {})[index] = time.monotonic()

        readers = [asyncio.create_task(watch(i)) for i in range(16)]
        async with asyncio.timeout(10):
            await asyncio.gather(*(r.wait() for r in ready))
        writer_of: dict[str, int] = {}
        acked: dict[str, float] = {}
        for i in range(events):
            task = await stubs[i % 16].CreateTask(create_request(f"t{i}"))
            acked[task.name] = time.monotonic()
            writer_of[task.name] = worker_of[i % 16]
            await asyncio.sleep(random.uniform(0.02, 0.1))
        await asyncio.sleep(0.5)
        assert sum(len(got) for got in arrivals.values()) == events * 16
        later: list[float] = []  # ms after the writer's worker's first delivery
        absolute: list[float] = []  # ms after the create was acknowledged
        for name, got in arrivals.items():
            own = min(t for i, t in got.items() if worker_of[i] == writer_of[name])
            for i, t in got.items():
                if worker_of[i] != writer_of[name]:
                    later.append((t - own) * 1000)
                    absolute.append((t - acked[name]) * 1000)
        later.sort()
        absolute.sort()
        p90 = later[int(len(later) * 0.9) - 1]
        p99 = later[int(len(later) * 0.99) - 1]
        record(
            "cross_worker_event_latency",
            workers=2,
            watchers=16,
            other_worker_deliveries=len(later),
            later_p50_ms=round(statistics.median(later), 1),
            later_p90_ms=round(p90, 1),
            later_p99_ms=round(p99, 1),
            p50_ms=round(statistics.median(absolute), 1),
            p99_ms=round(absolute[int(len(absolute) * 0.99) - 1], 1),
            max_ms=round(absolute[-1], 1),
            over_50_ms=round(sum(1 for ms in absolute if ms > 50) / len(absolute), 3),
        )
        # The other worker's poll wait, uniform over the poll interval: with
        # 20 ms, p50 ~10 ms, p90 ~18 ms; with 50 ms, ~25 and ~45 ms. The p99
        # (README: 50 ms) is recorded, not asserted: on this shared machine
        # one stall of one worker (87 ms at a load average of 13) moves it.
        assert statistics.median(later) < 17, later[:: len(later) // 20]
        assert p90 < 30, later[-len(later) // 10 :]
    finally:
        for reader in readers:
            reader.cancel()
        for c in channels:
            await c.close()
