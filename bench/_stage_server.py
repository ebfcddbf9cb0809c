"""TaskService with stages of a call switched off, for bench.stages only.

    BENCH_STAGES_OFF=pipeline,store python -m bench._stage_server

Each stage named in BENCH_STAGES_OFF is replaced before the server starts:
  pipeline  methods registered as the generated code registers them, without
            the call pipeline (no trace, admission, access line, own decode)
  store     the store answers GetTask and CreateTask from memory
  sqlread   GetTask's row comes from memory, converted as a read converts it
  servicer  GetTask and CreateTask answer a prebuilt Task (no validation,
            conversion or store)
  timer     the request read without its idle timer
  nosync    SQLite commits without fsync (what durability costs)
The access line is switched off with TASKSERVICE_ACCESS_LOG=off, as in
production. Not a way to run TaskService: a benchmark build.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

from tasks.v1 import task_service_pb2 as pb

from taskservice import __main__ as entry
from taskservice.api import calls, convert, service
from taskservice.domain.model import NewTask, Task, TaskContent
from taskservice.store.sqlite import SqliteStore


def _canned() -> Task:
    at = 1_790_000_000_123_456_000
    content = TaskContent(title="bench get", description="x" * 50, tags=("ops", "docs"))
    return Task("0b6c1e9a3f1e4a559d7e2f3c8f1f0a11", content, at, at, at)


def switch_off(stages: set[str]) -> None:
    if "pipeline" in stages:

        def register(self: Any, service_name: str, handlers: dict[str, Any]) -> None:
            self._server.add_registered_method_handlers(service_name, handlers)

        calls.PipelineRegistrar.add_registered_method_handlers = register  # type: ignore[method-assign]
    if "store" in stages:
        task = _canned()

        async def get(self: Any, task_id: str, timeout: float) -> Task:
            return task

        async def create_many(self: Any, items: Sequence[NewTask], timeout: float) -> list[Task]:
            return [
                dataclasses.replace(task, task_id=item.task_id, content=item.content)
                for item in items
            ]

        SqliteStore.get = get  # type: ignore[method-assign]
        SqliteStore.create_many = create_many  # type: ignore[method-assign]
    if "sqlread" in stages:  # the row from memory, converted as a read would
        from taskservice.store.sqlite._rows import COLUMNS, row_to_task

        rows: dict[str, Any] = {}

        async def get_cached(self: Any, task_id: str, timeout: float) -> Task:
            row = rows.get(task_id)
            if row is None:  # the first read of each task: from the file
                row = rows[task_id] = await self._engine.read(
                    lambda conn: conn.execute(
                        f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
                    ).fetchone(),
                    timeout,
                )
            return row_to_task(row)

        SqliteStore.get = get_cached  # type: ignore[method-assign]
    if "servicer" in stages:
        answer = convert.to_proto(_canned())

        async def canned(self: Any, request: Any, context: Any) -> pb.Task:
            return answer

        service.TaskServicer.GetTask = canned  # type: ignore[method-assign]
        service.TaskServicer.CreateTask = canned  # type: ignore[method-assign]
    if "nosync" in stages:  # commits without fsync: what durability costs
        from taskservice.store.sqlite import _engine

        opened = _engine.SqliteEngine.open

        def open_unsynced(self: Any, busy_timeout_ms: int) -> Any:
            conn = opened(self, busy_timeout_ms)
            conn.execute("PRAGMA synchronous = OFF")
            return conn

        _engine.SqliteEngine.open = open_unsynced  # type: ignore[method-assign]
    if "timer" in stages:

        async def read(self: Any, call: Any) -> bytes:
            raw = await call.context.read()
            call.request_bytes = len(raw)
            return bytes(raw)

        calls.CallPipeline._read_request = read  # type: ignore[method-assign]


if __name__ == "__main__":
    switch_off({s for s in os.environ.get("BENCH_STAGES_OFF", "").split(",") if s})
    sys.exit(entry.main())
