"""The embedded store: one SQLite file in WAL mode, with Firestore's semantics.

Writes run on one dedicated thread (SQLite has one writer at a time) inside
BEGIN IMMEDIATE transactions; reads run on a small pool of their own
connections, so a long batch commit does not stall reads and nothing blocks
the event loop. Every write stamps the row with a version time, in whole
microseconds like Firestore's, that is strictly greater than the previous one;
it is both the task's update_time and its etag. Databases written before
versions were whole microseconds are moved forward to the next microsecond
once, when the file is opened (schema version 1).
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from taskservice.errors import DeadlineExceeded, Unavailable
from taskservice.limits import REQUEST_ID_TTL_NS, check_batch_response_size
from taskservice.model import (
    PRIORITIES,
    STATES,
    VERSION_STEP_NS,
    ListQuery,
    ListResult,
    NewTask,
    OrderField,
    Task,
    TaskContent,
    TaskPatch,
)
from taskservice.store.common import (
    not_found,
    patched,
    request_id_of_deleted_task,
    stale_etag,
    taken,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    title       TEXT NOT NULL,
    description TEXT NOT NULL,
    priority    INTEGER NOT NULL,
    state       INTEGER NOT NULL,
    assignee    TEXT NOT NULL,
    tags        TEXT NOT NULL,
    create_ns   INTEGER NOT NULL,
    update_ns   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_create ON tasks (create_ns, task_id);
CREATE INDEX IF NOT EXISTS tasks_by_update ON tasks (update_ns, task_id);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    task_id    TEXT NOT NULL,
    expire_ns  INTEGER NOT NULL
) WITHOUT ROWID;
"""
_SCHEMA_VERSION = 1
# Schema 0 stamped versions in nanoseconds; move each to the next whole
# microsecond (never backwards, so ordering and later writes stay right).
_MIGRATE_TO_1 = (
    "UPDATE tasks SET update_ns = ((update_ns + 999) / 1000) * 1000 WHERE update_ns % 1000 != 0"
)
_COLUMNS = "task_id, title, description, priority, state, assignee, tags, create_ns, update_ns"
_READ_THREADS = 2
_GROUP_MAX = 256  # writes committed together at most


@dataclass(frozen=True, slots=True)
class _WriteOp:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _settle_all(results: list[tuple[_WriteOp, bool, Any]]) -> None:
    for op, ok, value in results:
        if op.future.done():  # the caller gave up
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)


def _now_version() -> int:
    """Now, in whole microseconds (as nanoseconds)."""
    return time.time_ns() // VERSION_STEP_NS * VERSION_STEP_NS


def _prepare(conn: sqlite3.Connection) -> None:
    """Creates the schema, or brings an older file's up to _SCHEMA_VERSION."""
    conn.executescript(_SCHEMA)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version < 1:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_MIGRATE_TO_1)
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")


def _row_to_task(row: Sequence[Any]) -> Task:
    return Task(
        task_id=row[0],
        content=TaskContent(
            title=row[1],
            description=row[2],
            priority=PRIORITIES[row[3]],
            state=STATES[row[4]],
            assignee=row[5],
            tags=tuple(json.loads(row[6])),
        ),
        create_time_ns=row[7],
        update_time_ns=row[8],
        version=row[8],
    )


class SqliteStore:
    """TaskStore over a local SQLite database file."""

    kind = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writes: queue.SimpleQueue[_WriteOp | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="sqlite-read")
        self._loop_conn: sqlite3.Connection | None = None
        self._ready = False

    # -- plumbing ---------------------------------------------------------

    def _open(self, busy_timeout_ms: int) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a write is on disk before it is acknowledged, even on power loss.
        conn.execute("PRAGMA synchronous = FULL")
        with self._lock:
            self._connections.append(conn)
        return conn

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open(10_000)
        return conn

    async def _write(self, fn: Callable[[sqlite3.Connection], T], timeout: float) -> T:
        """Runs fn in a write transaction on the writer thread.

        Group commit: the writer takes every write waiting in the queue, runs
        each in its own SAVEPOINT inside one transaction, and commits once, so
        concurrent writes share one fsync. A write is acknowledged only after
        that commit; a failing write rolls back to its savepoint alone.
        """
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="sqlite-write", daemon=True
            )
            self._writer.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._writes.put(_WriteOp(fn, loop, future))
        try:
            async with asyncio.timeout(timeout):
                result: T = await future
                return result
        except TimeoutError:
            raise DeadlineExceeded("the store did not answer in time") from None

    def _write_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            first = self._writes.get()
            if first is None:
                return
            group = [first]
            while len(group) < _GROUP_MAX:
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._writes.put(None)  # stop after this group
                    break
                group.append(more)
            outcomes: list[tuple[_WriteOp, bool, Any]] = []
            try:
                if conn is None:
                    conn = self._open(10_000)
                    if not self._ready:
                        _prepare(conn)
                        self._ready = True
                conn.execute("BEGIN IMMEDIATE")
                for op in group:
                    if op.future.done():  # the caller gave up: do not write
                        continue
                    conn.execute("SAVEPOINT op")
                    try:
                        outcomes.append((op, True, op.fn(conn)))
                        conn.execute("RELEASE op")
                    except Exception as exc:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        outcomes.append((op, False, exc))
                conn.execute("COMMIT")
            except Exception as exc:  # the file cannot be opened or written
                if conn is not None and conn.in_transaction:
                    conn.execute("ROLLBACK")
                failure = Unavailable("the task database is unavailable")
                failure.__cause__ = exc
                outcomes = [(op, False, failure) for op in group]
            settled: dict[asyncio.AbstractEventLoop, list[tuple[_WriteOp, bool, Any]]] = {}
            for op, ok, value in outcomes:
                if not ok and isinstance(value, sqlite3.Error):
                    unavailable = Unavailable("the task database is unavailable")
                    unavailable.__cause__ = value
                    value = unavailable
                settled.setdefault(op.loop, []).append((op, ok, value))
            # One wake-up of the loop per group, not one per write.
            for loop, results in settled.items():
                loop.call_soon_threadsafe(_settle_all, results)

    async def _read(self, fn: Callable[[sqlite3.Connection], T], timeout: float) -> T:
        """Runs fn on the event loop's own connection: WAL readers never wait
        for the writer, and a point read costs less than a hop to a thread.
        If the file is busy anyway (recovery, a checkpoint), the read moves to
        the reader pool, which waits."""
        if not self._ready:
            await self._write(lambda conn: None, timeout)  # the writer creates the schema
        try:
            if self._loop_conn is None:
                self._loop_conn = self._open(0)
            return fn(self._loop_conn)
        except sqlite3.OperationalError:
            pass
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable("the task database is unavailable") from exc
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                return await loop.run_in_executor(self._readers, lambda: fn(self._connection()))
        except TimeoutError:
            raise DeadlineExceeded("the store did not answer in time") from None
        except sqlite3.OperationalError as exc:  # locked, disk I/O, unopenable file
            raise Unavailable("the task database is unavailable") from exc

    @staticmethod
    def _next_version(previous_ns: int) -> int:
        return max(_now_version(), previous_ns + VERSION_STEP_NS)

    # -- TaskStore --------------------------------------------------------

    async def check(self, timeout: float) -> None:
        await self._read(
            lambda conn: conn.execute("SELECT 1 FROM tasks LIMIT 1").fetchall(), timeout
        )

    async def create_many(self, items: Sequence[NewTask], timeout: float) -> list[Task]:
        def create(conn: sqlite3.Connection) -> list[Task]:
            now = _now_version()
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
                            f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?", (row[0],)
                        ).fetchone()
                        if existing is None:
                            raise request_id_of_deleted_task(row[0])
                        results.append(_row_to_task(existing))
                        replayed = True
                        continue
                c = item.content
                try:
                    conn.execute(
                        f"INSERT INTO tasks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            item.task_id,
                            c.title,
                            c.description,
                            int(c.priority),
                            int(c.state),
                            c.assignee,
                            json.dumps(c.tags),
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
                results.append(Task(item.task_id, c, now, now, now))
            if replayed:  # the first tasks may be larger than these items
                check_batch_response_size((t.task_id, t.content) for t in results)
            return results

        return await self._write(create, timeout)

    async def get(self, task_id: str, timeout: float) -> Task:
        def get(conn: sqlite3.Connection) -> Task:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise not_found(task_id)
            return _row_to_task(row)

        return await self._read(get, timeout)

    async def update(
        self, task_id: str, patch: TaskPatch, expected_version: int | None, timeout: float
    ) -> Task:
        def update(conn: sqlite3.Connection) -> Task:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise not_found(task_id)
            current = _row_to_task(row)
            content = patched(current, patch, expected_version)
            version = self._next_version(current.update_time_ns)
            conn.execute(
                "UPDATE tasks SET title = ?, description = ?, priority = ?, state = ?,"
                " assignee = ?, tags = ?, update_ns = ? WHERE task_id = ?",
                (
                    content.title,
                    content.description,
                    int(content.priority),
                    int(content.state),
                    content.assignee,
                    json.dumps(content.tags),
                    version,
                    task_id,
                ),
            )
            return Task(task_id, content, current.create_time_ns, version, version)

        return await self._write(update, timeout)

    async def delete(self, task_id: str, expected_version: int | None, timeout: float) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            if expected_version is None:
                cur = conn.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
            else:
                cur = conn.execute(
                    "DELETE FROM tasks WHERE task_id = ? AND update_ns = ?",
                    (task_id, expected_version),
                )
            if cur.rowcount == 0:
                exists = conn.execute(
                    "SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                if exists is None:
                    raise not_found(task_id)
                raise stale_etag(task_id)

        await self._write(delete, timeout)

    async def list(self, query: ListQuery, timeout: float) -> ListResult:
        column = "create_ns" if query.ordering.field is OrderField.CREATE_TIME else "update_ns"
        direction = "DESC" if query.ordering.descending else "ASC"
        where: list[str] = []
        args: list[Any] = []
        f = query.filter
        if f.state is not None:
            where.append("state = ?")
            args.append(int(f.state))
        if f.priority is not None:
            where.append("priority = ?")
            args.append(int(f.priority))
        if f.assignee is not None:
            where.append("assignee = ?")
            args.append(f.assignee)
        if f.tag is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE value = ?)")
            args.append(f.tag)
        if query.after is not None:
            where.append(f"({column}, task_id) {'<' if query.ordering.descending else '>'} (?, ?)")
            args.extend((query.after.time_ns, query.after.task_id))
        sql = (
            f"SELECT {_COLUMNS} FROM tasks"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY {column} {direction}, task_id {direction} LIMIT ?"
        )
        args.append(query.limit + 1)

        def run(conn: sqlite3.Connection) -> ListResult:
            rows = conn.execute(sql, args).fetchall()
            return ListResult(
                [_row_to_task(r) for r in rows[: query.limit]], has_more=len(rows) > query.limit
            )

        return await self._read(run, timeout)

    async def close(self) -> None:
        if self._writer is not None:
            self._writes.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._loop_conn = None
