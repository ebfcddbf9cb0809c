"""SqliteStore: the TaskStore calls on the SQLite engine, each write in one
transaction that also appends to the change log."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from taskservice.domain.changes import WatchEvent, WatchQuery
from taskservice.domain.limits import REQUEST_ID_TTL_NS
from taskservice.domain.model import (
    ListQuery,
    ListResult,
    NewTask,
    OrderField,
    Task,
    TaskPatch,
)
from taskservice.domain.sizes import check_batch_response_size
from taskservice.store._common import (
    not_found,
    patched,
    request_id_of_deleted_task,
    stale_etag,
    taken,
)
from taskservice.store.sqlite._engine import SqliteEngine, next_version, now_version
from taskservice.store.sqlite._feed import ChangeLog, log_change
from taskservice.store.sqlite._rows import COLUMNS, row_to_task, tags_json, where_of

if TYPE_CHECKING:
    from taskservice.observe.telemetry import Telemetry


class SqliteStore:
    """TaskStore over a local SQLite database file."""

    kind = "sqlite"

    def __init__(self, path: str | Path, watch_retention_seconds: float = 3600.0) -> None:
        self.path = str(path)
        self.watch_retention_ns = int(watch_retention_seconds * 1e9)
        self._engine = SqliteEngine(path, watch_retention_seconds)
        self._log = ChangeLog(self._engine)

    # -- TaskStore --------------------------------------------------------

    async def check(self, timeout: float) -> None:
        await self._engine.read(
            lambda conn: conn.execute("SELECT 1 FROM tasks LIMIT 1").fetchall(), timeout
        )

    async def create_many(self, items: Sequence[NewTask], timeout: float) -> list[Task]:
        def create(conn: sqlite3.Connection) -> list[Task]:
            now = now_version()
            results: list[Task] = []
            replayed = False  # an item answered with the task its request_id created
            for index, item in enumerate(items):
                if item.request_id is not None:
                    row = conn.execute(
                        "SELECT task_id FROM requests WHERE request_id = ? AND expire_ns > ?",
                        (item.request_id, now),
                    ).fetchone()
                    if row is not None:
                        existing = conn.execute(
                            f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?", (row[0],)
                        ).fetchone()
                        if existing is None:
                            raise request_id_of_deleted_task(row[0])
                        results.append(row_to_task(existing))
                        replayed = True
                        continue
                c = item.content
                try:
                    conn.execute(
                        f"INSERT INTO tasks ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            item.task_id,
                            c.title,
                            c.description,
                            int(c.priority),
                            int(c.state),
                            c.assignee,
                            tags_json(c.tags),
                            now,
                            now,
                        ),
                    )
                except sqlite3.IntegrityError:
                    raise taken(item.task_id, index) from None
                if item.request_id is not None:
                    conn.execute(
                        "INSERT OR REPLACE INTO requests VALUES (?, ?, ?)",
                        (item.request_id, item.task_id, now + REQUEST_ID_TTL_NS),
                    )
                created = Task(item.task_id, c, now, now, now)
                log_change(conn, item.task_id, now, None, created)
                results.append(created)
            if replayed:  # the first tasks may be larger than these items
                check_batch_response_size((t.task_id, t.content) for t in results)
            return results

        return await self._engine.write(create, timeout)

    async def get(self, task_id: str, timeout: float) -> Task:
        def get(conn: sqlite3.Connection) -> Task:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise not_found(task_id)
            return row_to_task(row)

        return await self._engine.read(get, timeout)

    async def update(
        self, task_id: str, patch: TaskPatch, expected_version: int | None, timeout: float
    ) -> Task:
        def update(conn: sqlite3.Connection) -> Task:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise not_found(task_id)
            current = row_to_task(row)
            content = patched(current, patch, expected_version)
            version = next_version(current.update_time_ns)
            conn.execute(
                "UPDATE tasks SET title = ?, description = ?, priority = ?, state = ?,"
                " assignee = ?, tags = ?, update_ns = ? WHERE task_id = ?",
                (
                    content.title,
                    content.description,
                    int(content.priority),
                    int(content.state),
                    content.assignee,
                    tags_json(content.tags),
                    version,
                    task_id,
                ),
            )
            updated = Task(task_id, content, current.create_time_ns, version, version)
            log_change(conn, task_id, version, current, updated)
            return updated

        return await self._engine.write(update, timeout)

    async def delete(self, task_id: str, expected_version: int | None, timeout: float) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            if expected_version is None:
                row = conn.execute(
                    f"DELETE FROM tasks WHERE task_id = ? RETURNING {COLUMNS}", (task_id,)
                ).fetchone()
            else:
                row = conn.execute(
                    f"DELETE FROM tasks WHERE task_id = ? AND update_ns = ? RETURNING {COLUMNS}",
                    (task_id, expected_version),
                ).fetchone()
            if row is None:
                exists = conn.execute(
                    "SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                if exists is None:
                    raise not_found(task_id)
                raise stale_etag(task_id)
            before = row_to_task(row)
            log_change(conn, task_id, next_version(before.version), before, None)

        await self._engine.write(delete, timeout)

    async def list(self, query: ListQuery, timeout: float) -> ListResult:
        column = "create_ns" if query.ordering.field is OrderField.CREATE_TIME else "update_ns"
        direction = "DESC" if query.ordering.descending else "ASC"
        where, args = where_of(query.filter)
        if query.after is not None:
            where.append(f"({column}, task_id) {'<' if query.ordering.descending else '>'} (?, ?)")
            args.extend((query.after.time_ns, query.after.task_id))
        sql = (
            f"SELECT {COLUMNS} FROM tasks"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY {column} {direction}, task_id {direction} LIMIT ?"
        )
        args.append(query.limit + 1)

        def run(conn: sqlite3.Connection) -> ListResult:
            rows = conn.execute(sql, args).fetchall()
            return ListResult(
                [row_to_task(r) for r in rows[: query.limit]], has_more=len(rows) > query.limit
            )

        return await self._engine.read(run, timeout)

    # -- WatchTasks ---------------------------------------------------------

    def watch(self, query: WatchQuery) -> AsyncIterator[WatchEvent]:
        """The events of query.filter from the change log (see
        taskservice.store.sqlite._feed)."""
        return self._log.watch(query)

    def use_telemetry(self, telemetry: Telemetry) -> None:
        self._engine.telemetry = telemetry

    async def close(self) -> None:
        self._log.close()
        await self._engine.close()
