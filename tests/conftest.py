"""The suite's fixtures: the real Cloud Firestore emulator, a store of each
kind, and a real server over it. Helpers live in harness/ (shared with bench)
and tests/helpers/; nothing imports this module.

The emulator is started once per session by the tests themselves. Where it is
not installed, every Firestore test is skipped, and the run ends with a red
banner saying so (as it does for every suite skipped with loud_skip).

TASKSERVICE_TEST_WORKERS=N makes `running` a `python -m taskservice` process
with N workers (TASKSERVICE_WORKERS) instead of an in-process server: the
contract suite runs so in CI too (only `running.stub` is used there).
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import (
    Emulator,
    Running,
    emulator_jar,
    firestore_store,
    start_emulator,
    start_process,
    start_server,
)
from harness.otlp import Receiver, start_receiver
from taskservice.observe import jsonlog
from taskservice.store import TaskStore
from taskservice.store.sqlite import SqliteStore
from tests.helpers import LOUD_SKIPS, loud_skip


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    jar = emulator_jar()
    if jar is None:
        loud_skip(
            "FIRESTORE TESTS SKIPPED: the Cloud Firestore emulator jar (or java) was not found"
            " (set FIRESTORE_EMULATOR_JAR); these tests did NOT run"
        )
    started = start_emulator(jar, tmp_path_factory.mktemp("emulator") / "emulator.log")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The JSON lines the process logs meanwhile (traces in project demo-proj)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(jsonlog.JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    jsonlog.set_project("demo-proj")
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)
    jsonlog.set_project("")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason in LOUD_SKIPS:
        terminalreporter.write_sep("!", reason, red=True, bold=True)


@pytest.fixture(params=["sqlite", "firestore"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    made: TaskStore
    if request.param == "sqlite":
        made = SqliteStore(tmp_path / "tasks.db")
    else:
        made = firestore_store(request.getfixturevalue("emulator").host)
    yield made
    await made.close()


WORKERS = int(os.environ.get("TASKSERVICE_TEST_WORKERS", "1"))


@pytest.fixture
async def running(
    store: TaskStore, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Running]:
    if WORKERS == 1:
        r = await start_server(store)
        yield r
        await r.close(grace=1)
        return
    env = {"TASKSERVICE_WORKERS": str(WORKERS), "TASKSERVICE_STORE": store.kind}
    if store.kind == "sqlite":
        env["TASKSERVICE_SQLITE_PATH"] = str(tmp_path / "workers.db")
    else:
        env["FIRESTORE_EMULATOR_HOST"] = request.getfixturevalue("emulator").host
        env["GOOGLE_CLOUD_PROJECT"] = f"demo-w{uuid.uuid4().hex[:12]}"
    process = await start_process(env, tmp_path)
    yield process  # type: ignore[misc]
    await process.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A local OTLP receiver (harness.otlp), stopped after the test."""
    started = await start_receiver()
    yield started
    assert started.server is not None
    await started.server.stop(0)
