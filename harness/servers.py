"""TaskService servers for tests and benchmarks: as a process, or in-process.

ServerProcess runs `python -m taskservice` (or another module) as an operator
would: in its own process, configured by the environment (whatever the
caller's shell has that would pick a store is dropped first), its output
kept in a file (a pipe left unread would stall a busy server), with CPU and
memory readings from /proc. start_server runs a TaskServer on the caller's
event loop, with a channel and stubs to it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tasks.v1 import task_service_pb2_grpc

from harness.net import free_port, wait_for_port
from taskservice.config import Config
from taskservice.runtime.server import TaskServer
from taskservice.store import TaskStore

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Settings a developer's shell may hold that would pick another store.
_SCRUBBED = (
    "K_SERVICE",
    "GOOGLE_CLOUD_PROJECT",
    "GCP_PROJECT",
    "FIRESTORE_EMULATOR_HOST",
    "TASKSERVICE_STORE",
    "TASKSERVICE_SQLITE_PATH",
)
# A channel's first connection attempt fails while a server is starting, and
# gRPC then backs off ~1 s before it tries again: retry every 10 ms instead.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 10),
]
SERVING = health_pb2.HealthCheckResponse.SERVING


def server_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without the store-picking settings, plus env."""
    full = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    full["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    full.update(env or {})
    return full


class ServerProcess:
    """A server in its own process, listening on 127.0.0.1:port.

    env is added to a scrubbed os.environ (PORT, TASKSERVICE_HOST, a
    LOG_LEVEL of WARNING and TASKSERVICE_ACCESS_LOG=off are set unless env
    says otherwise); args go to the
    module; wait=False returns before the port accepts connections;
    keep_output=False discards the output (a benchmark's millions of access
    lines).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        *,
        port: int | None = None,
        args: Sequence[str] = (),
        module: str = "taskservice",
        wait: bool = True,
        keep_output: bool = True,
    ) -> None:
        self.port = port or free_port()
        full = server_env(
            {
                "PORT": str(self.port),
                "TASKSERVICE_HOST": "127.0.0.1",
                "LOG_LEVEL": "WARNING",
                "TASKSERVICE_ACCESS_LOG": "off",
            }
        )
        full.update(env or {})
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as self
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=full,
            cwd=cwd or ROOT,
            stdout=self._log if keep_output else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        if wait and not wait_for_port("127.0.0.1", self.port, 30):
            self.kill()
            raise RuntimeError(f"the server did not listen:\n{self.output}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def wait_serving(self, timeout: float = 30) -> None:
        """Blocks until health Check says SERVING."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"the server never became SERVING:\n{self.output}")
                time.sleep(0.01)

    def pids(self) -> list[int]:
        """The process and its children (the workers of TASKSERVICE_WORKERS)."""
        return [self.proc.pid, *children(self.proc.pid)]

    def cpu_s(self) -> float:
        """CPU seconds used so far, by the process and its live children."""
        return sum(_cpu_s(pid) for pid in self.pids())

    def rss_mb(self) -> float:
        """Resident memory of the process and its children."""
        return sum(_rss_mb(pid) for pid in self.pids())

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 15) -> tuple[int, str]:
        """Waits for the process to exit (SIGKILL after timeout): its exit code
        and its output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.output

    def stop(self, timeout: float = 15) -> tuple[int, str]:
        """SIGTERM, then finish()."""
        self.signal(signal.SIGTERM)
        return self.finish(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)


def children(pid: int) -> list[int]:
    """The live child processes of pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss_mb(pid: int) -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Running:
    """An in-process TaskServer with a channel and stubs to it."""

    server: TaskServer
    channel: grpc.aio.Channel
    stub: task_service_pb2_grpc.TaskServiceStub
    health: health_pb2_grpc.HealthStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def close(self, grace: float = 0) -> None:
        await self.channel.close()
        await self.server.stop(grace=grace)


@dataclass
class ProcessRunning:
    """A server process with a channel and stubs to it: what the contract
    suite needs of `running` when it runs against TASKSERVICE_WORKERS."""

    process: ServerProcess
    channel: grpc.aio.Channel
    stub: task_service_pb2_grpc.TaskServiceStub
    health: health_pb2_grpc.HealthStub

    @property
    def target(self) -> str:
        return self.process.target

    async def close(self, grace: float = 0) -> None:
        await self.channel.close()
        code, output = await asyncio.to_thread(self.process.stop)
        assert code == 0, output[-3000:]


async def start_process(env: Mapping[str, str], cwd: Path) -> ProcessRunning:
    process = ServerProcess(env, cwd)
    await asyncio.to_thread(process.wait_serving)
    channel = grpc.aio.insecure_channel(process.target)
    return ProcessRunning(
        process,
        channel,
        task_service_pb2_grpc.TaskServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )


async def health_serving(health: health_pb2_grpc.HealthStub, timeout: float = 10.0) -> None:
    """Waits until the server behind `health` answers SERVING (a process's
    own readiness: ServerProcess.wait_serving)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        response = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        if response.status == SERVING:
            return
        if loop.time() > deadline:
            raise TimeoutError("server did not become SERVING")
        await asyncio.sleep(0.05)


async def start_server(
    store: TaskStore, config: Config | None = None, *, ready: bool = True
) -> Running:
    """A TaskServer on 127.0.0.1:0 with a channel to it; waits for SERVING
    unless ready=False (a store that is down on purpose)."""
    server = TaskServer(config or Config(host="127.0.0.1", port=0, grace_seconds=2.0), store)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    running = Running(
        server,
        channel,
        task_service_pb2_grpc.TaskServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )
    if ready:
        await health_serving(running.health)
    return running
