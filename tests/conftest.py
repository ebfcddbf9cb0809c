"""Shared fixtures: the real Cloud Firestore emulator, stores, and a real server.

The emulator is started once per session by the tests themselves (java -cp
the official jar). Where it is not installed, every Firestore test is skipped
with a loud reason, repeated in the session summary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tasks.v1 import task_service_pb2_grpc

from taskservice.config import Config
from taskservice.server import TaskServer
from taskservice.store import TaskStore
from taskservice.store.firestore import FirestoreStore
from taskservice.store.sqlite import SqliteStore
from tests.support import CallCounter, emulator_jar, free_port, launch_emulator, wait_for_port

__all__ = ["CallCounter", "emulator_jar", "free_port", "launch_emulator", "wait_for_port"]

_LOUD_SKIPS: list[str] = []


def loud_skip(reason: str) -> NoReturn:
    """Skips, and repeats the reason in a red banner at the end of the run:
    for whole suites (Firestore, Node interop) that did not run here."""
    if reason not in _LOUD_SKIPS:
        _LOUD_SKIPS.append(reason)
    pytest.skip(reason)


@dataclass
class Emulator:
    host: str
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    jar = emulator_jar()
    if jar is None:
        reason = (
            "FIRESTORE TESTS SKIPPED: the Cloud Firestore emulator jar (or java) was not found"
            " (set FIRESTORE_EMULATOR_JAR); these tests did NOT run"
        )
        loud_skip(reason)
    port = free_port()
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    process = launch_emulator(jar, port, log)
    try:
        if not wait_for_port("127.0.0.1", port, 60):
            raise RuntimeError(f"the Firestore emulator did not start; see {log}")
        yield Emulator(f"127.0.0.1:{port}", process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason in _LOUD_SKIPS:
        terminalreporter.write_sep("!", reason, red=True, bold=True)


def firestore_store(emulator: Emulator, counter: CallCounter | None = None) -> FirestoreStore:
    channel = grpc.aio.insecure_channel(
        emulator.host, interceptors=counter.interceptors() if counter is not None else None
    )
    return FirestoreStore(
        channel,
        project=f"demo-t{uuid.uuid4().hex[:12]}",
        extra_metadata=(("authorization", "Bearer owner"),),
    )


@pytest.fixture(params=["sqlite", "firestore"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    made: TaskStore
    if request.param == "sqlite":
        made = SqliteStore(tmp_path / "tasks.db")
    else:
        made = firestore_store(request.getfixturevalue("emulator"))
    yield made
    await made.close()


@dataclass
class Running:
    server: TaskServer
    channel: grpc.aio.Channel
    stub: task_service_pb2_grpc.TaskServiceStub
    health: health_pb2_grpc.HealthStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def wait_serving(health: health_pb2_grpc.HealthStub, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        response = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        if response.status == health_pb2.HealthCheckResponse.SERVING:
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
        await wait_serving(running.health)
    return running


@pytest.fixture
async def running(store: TaskStore) -> AsyncIterator[Running]:
    r = await start_server(store)
    yield r
    await r.channel.close()
    await r.server.stop(grace=1)


class ServerProcess:
    """`python -m taskservice` in a subprocess, on a free loopback port."""

    def __init__(self, env: dict[str, str], cwd: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        full = {
            k: v
            for k, v in os.environ.items()
            if k
            not in ("K_SERVICE", "GOOGLE_CLOUD_PROJECT", "GCP_PROJECT", "FIRESTORE_EMULATOR_HOST")
        }
        full.update(PORT=str(self.port), TASKSERVICE_HOST="127.0.0.1", LOG_LEVEL="WARNING")
        full.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskservice"],
            env=full,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if not wait_for_port("127.0.0.1", self.port, 30):
            self.proc.kill()
            raise RuntimeError("the server did not listen")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, timeout: float = 15) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=15)
