"""The embedded store: one SQLite file in WAL mode, with Firestore's semantics.

Writes run on one dedicated thread (SQLite has one writer at a time) inside
BEGIN IMMEDIATE transactions; reads run on a small pool of their own
connections, so a long batch commit does not stall reads and nothing blocks
the event loop. Every write stamps the row with a version time, in whole
microseconds like Firestore's, that is strictly greater than the previous one;
it is both the task's update_time and its etag. Databases written before
versions were whole microseconds are moved forward to the next microsecond
once, when the file is opened (schema version 1).

Every write also appends to a change log in the same transaction (schema
version 2): the task before and after, under a sequence number that orders
every commit of every process sharing the file. WatchTasks reads it (see
`watch`), so a watch resumes exactly after a restart; the writer trims
entries older than the retention (TASKSERVICE_WATCH_RETENTION_SECONDS).

`unusable_reason` tells, before a server starts, why a path cannot hold the
database (a directory, a read-only file system, a place where no file can be
created), so that the entry point stops at once saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from taskservice.domain.changes import ChangeType, WatchEvent, WatchQuery, event_for, matches
from taskservice.domain.errors import DeadlineExceeded, InvalidArgument, OutOfRange, Unavailable
from taskservice.domain.limits import REQUEST_ID_TTL_NS, check_batch_response_size
from taskservice.domain.model import (
    PRIORITIES,
    STATES,
    VERSION_STEP_NS,
    ListQuery,
    ListResult,
    NewTask,
    OrderField,
    Task,
    TaskContent,
    TaskFilter,
    TaskPatch,
)
from taskservice.store._common import (
    not_found,
    patched,
    request_id_of_deleted_task,
    stale_etag,
    taken,
)

if TYPE_CHECKING:
    from taskservice.observe.telemetry import Telemetry

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
CREATE TABLE IF NOT EXISTS changes (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id   TEXT NOT NULL,
    commit_ns INTEGER NOT NULL,
    before    TEXT,
    after     TEXT
);
CREATE TABLE IF NOT EXISTS watch_meta (
    key   TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
INSERT OR IGNORE INTO watch_meta VALUES ('log_id', lower(hex(randomblob(8))));
INSERT OR IGNORE INTO watch_meta VALUES ('trimmed_through', 0);
"""
_SCHEMA_VERSION = 2
# Schema 0 stamped versions in nanoseconds; move each to the next whole
# microsecond (never backwards, so ordering and later writes stay right).
_MIGRATE_TO_1 = (
    "UPDATE tasks SET update_ns = ((update_ns + 999) / 1000) * 1000 WHERE update_ns % 1000 != 0"
)
_COLUMNS = "task_id, title, description, priority, state, assignee, tags, create_ns, update_ns"
_READ_THREADS = 2
_GROUP_MAX = 256  # writes committed together at most
_CHANGE_COLUMNS = "seq, task_id, commit_ns, before, after"
# The head of the log: AUTOINCREMENT never reuses a number, even once trimmed.
_HEAD = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)"
_TRIM_EVERY_SECONDS = 10.0
_TRIM_BATCH = 10_000  # log entries deleted per transaction
# How often a watching process looks for commits by other processes on the
# same file (PRAGMA data_version); its own commits wake its watchers at once.
# 20 ms keeps the README's 50 ms at p99 (a 50 ms poll put 7% of another
# worker's events past it); a poll is one PRAGMA, and runs only while the
# process has a watcher: an idle process with one watcher used 1.0% of a core
# (0.6% with 50 ms).
_POLL_SECONDS = 0.02
_FEED_KEEP = 4096  # recent log entries kept in memory for the watchers
_LOG_PAGE = 500  # log entries a watcher behind the kept ones reads at a time
# A resume position: b"S", the log's id, a mode, the sequence number, and for
# a position inside an initial snapshot the last task id sent.
_POSITION = struct.Struct(">c8sBQ")
_LIVE, _INITIAL = 1, 2


@dataclass(slots=True)
class _WriteOp:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    # The group commit that carried it (started_ns, ended_ns, writes, ok),
    # set by the writer when telemetry is on.
    commit: tuple[int, int, int, bool] | None = None


def _settle_all(results: list[tuple[_WriteOp, bool, Any]]) -> None:
    for op, ok, value in results:
        if op.future.done():  # the caller gave up
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)


def _file_system_of(path: Path) -> tuple[str, bool]:
    """The type of the file system that holds path, and whether it is
    mounted read-only (from /proc/self/mounts; ("", False) where unknown)."""
    best, found = "", ("", False)
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return found
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, found = point, (fields[2], "ro" in fields[3].split(","))
    return found


def _existing_ancestor(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def unusable_reason(path: str | Path) -> str | None:
    """Why the SQLite database cannot live at path, in a few words; None when
    it can (the file, and its directory, are created when missing; a write
    transaction is begun and rolled back to prove the file writable)."""
    file = Path(path)
    if file.is_dir():
        return "is a directory, not a file"
    ancestor = _existing_ancestor(file.parent)
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is a file, not a directory"
    fs_type, read_only = _file_system_of(ancestor)
    if read_only:
        return f"is on a read-only file system ({fs_type})"
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        existed = file.exists()
        os.close(os.open(file, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as err:
        where = f" on a {fs_type} file system" if fs_type in _VIRTUAL_FILE_SYSTEMS else ""
        return f"cannot be created{where} ({err.strerror or err})"
    try:
        conn = sqlite3.connect(file, isolation_level=None, timeout=10)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.Error as err:
        if not existed:
            with contextlib.suppress(OSError):
                if file.stat().st_size == 0:
                    file.unlink()
        return f"cannot be used as a SQLite database ({err})"
    return None


_VIRTUAL_FILE_SYSTEMS = ("proc", "sysfs", "devtmpfs", "cgroup", "cgroup2", "debugfs", "securityfs")


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
    elif version < 2:  # schema 2 only adds the change log (created above)
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


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


def _task_json(task: Task) -> str:
    c = task.content
    return json.dumps(
        [
            c.title,
            c.description,
            int(c.priority),
            int(c.state),
            c.assignee,
            c.tags,
            task.create_time_ns,
            task.update_time_ns,
        ],
        ensure_ascii=False,
    )


def _task_from_json(task_id: str, text: str) -> Task:
    title, description, priority, state, assignee, tags, create_ns, update_ns = json.loads(text)
    return Task(
        task_id,
        TaskContent(title, description, PRIORITIES[priority], STATES[state], assignee, tuple(tags)),
        create_ns,
        update_ns,
        update_ns,
    )


def _log_change(
    conn: sqlite3.Connection, task_id: str, commit_ns: int, before: Task | None, after: Task | None
) -> None:
    conn.execute(
        "INSERT INTO changes (task_id, commit_ns, before, after) VALUES (?, ?, ?, ?)",
        (
            task_id,
            commit_ns,
            None if before is None else _task_json(before),
            None if after is None else _task_json(after),
        ),
    )


@dataclass(frozen=True, slots=True)
class _LoggedChange:
    seq: int
    task_id: str
    commit_ns: int
    before: Task | None
    after: Task | None


def _logged(row: Sequence[Any]) -> _LoggedChange:
    seq, task_id, commit_ns, before, after = row
    return _LoggedChange(
        seq,
        task_id,
        commit_ns,
        None if before is None else _task_from_json(task_id, before),
        None if after is None else _task_from_json(task_id, after),
    )


def _where(f: TaskFilter) -> tuple[list[str], list[Any]]:
    """The SQL conditions (on table `tasks`) of a filter, and their arguments."""
    where: list[str] = []
    args: list[Any] = []
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
    return where, args


class _ChangeFeed:
    """The tail of the change log, read once for all the watchers of one
    process: woken at once by this process's commits, and every _POLL_SECONDS
    by PRAGMA data_version for those of other processes on the file. Keeps
    the last _FEED_KEEP entries; a watcher further behind reads the log."""

    def __init__(self, store: SqliteStore, head: int) -> None:
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.recent: deque[_LoggedChange] = deque()
        self.floor = head  # `recent` holds every entry after this...
        self.head = head  # ...up to this one
        self.checked_ns = time.time_ns()  # when the log was last seen to end at head
        self.watchers = 0
        self._updated = asyncio.Event()
        self._poked = asyncio.Event()
        self._data_version: int | None = None
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self._poked.set()

    def join(self) -> None:
        self.watchers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow())

    def leave(self) -> None:
        self.watchers -= 1

    def since(self, seq: int) -> list[_LoggedChange] | None:
        """The entries after seq, from memory; None when seq is older than
        what is kept (read the log instead)."""
        if seq < self.floor:
            return None
        if seq >= self.head:
            return []
        start = len(self.recent) - (self.head - seq)
        if start >= 0 and (start == 0 or self.recent[start - 1].seq == seq):
            return list(self.recent)[start:]
        return [c for c in self.recent if c.seq > seq]  # numbers with gaps

    async def wait(self, timeout: float) -> None:
        """Returns when new entries arrive, or after timeout seconds."""
        updated = self._updated
        try:
            async with asyncio.timeout(timeout):
                await updated.wait()
        except TimeoutError:
            pass

    async def _follow(self) -> None:
        while self.watchers > 0:
            try:
                async with asyncio.timeout(_POLL_SECONDS):
                    await self._poked.wait()
            except TimeoutError:
                pass
            self._poked.clear()
            try:
                await self._read_new()
            except Exception:  # the file is busy or gone: try again at the next poll
                continue

    async def _read_new(self) -> None:
        def read(conn: sqlite3.Connection) -> tuple[int, list[Any]]:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return version, []
            return version, conn.execute(
                f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (self.head, _LOG_PAGE),
            ).fetchall()

        while True:
            version, rows = await self.store._read(read, 5.0)
            self._data_version = version  # read before the rows: never misses a commit
            self.checked_ns = time.time_ns()
            if not rows:
                return
            for row in rows:
                self.recent.append(_logged(row))
            self.head = self.recent[-1].seq
            while len(self.recent) > _FEED_KEEP:
                self.floor = self.recent.popleft().seq
            updated, self._updated = self._updated, asyncio.Event()
            updated.set()
            if len(rows) < _LOG_PAGE:
                return


class SqliteStore:
    """TaskStore over a local SQLite database file."""

    kind = "sqlite"

    def __init__(self, path: str | Path, watch_retention_seconds: float = 3600.0) -> None:
        self.path = str(path)
        self.watch_retention_ns = int(watch_retention_seconds * 1e9)
        self._trim_every = min(_TRIM_EVERY_SECONDS, watch_retention_seconds / 2)
        self._feed: _ChangeFeed | None = None
        self._telemetry: Telemetry | None = None
        self._log_id: bytes | None = None
        self._trimmed_at = 0.0
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
        op = _WriteOp(fn, loop, future)
        self._writes.put(op)
        try:
            async with asyncio.timeout(timeout):
                result: T = await future
                return result
        except TimeoutError:
            raise DeadlineExceeded("the store did not answer in time") from None
        finally:
            telemetry = self._telemetry
            if telemetry is not None and op.commit is not None:
                telemetry.sqlite_commit_span(*op.commit)

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
            started_ns = time.time_ns()
            committed = False
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
                committed = True
            except Exception as exc:  # the file cannot be opened or written
                if conn is not None and conn.in_transaction:
                    conn.execute("ROLLBACK")
                failure = Unavailable("the task database is unavailable")
                failure.__cause__ = exc
                outcomes = [(op, False, failure) for op in group]
            telemetry = self._telemetry
            if telemetry is not None:
                ended_ns = time.time_ns()
                telemetry.sqlite_group(len(group), (ended_ns - started_ns) / 1e9, committed)
                for op in group:
                    op.commit = (started_ns, ended_ns, len(group), committed)
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
            feed = self._feed
            if feed is not None and feed.watchers > 0:
                feed.loop.call_soon_threadsafe(feed.poke)
            if conn is not None and time.monotonic() - self._trimmed_at > self._trim_every:
                self._trimmed_at = time.monotonic()
                try:
                    self._trim(conn)
                except sqlite3.Error:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")

    def _trim(self, conn: sqlite3.Connection) -> None:
        """Deletes log entries older than the retention, oldest first, in
        batches (on the writer thread, between groups)."""
        cutoff = time.time_ns() - self.watch_retention_ns
        for _ in range(10):
            conn.execute("BEGIN IMMEDIATE")
            (last,) = conn.execute(
                "SELECT max(seq) FROM (SELECT seq, commit_ns FROM changes ORDER BY seq LIMIT ?)"
                " WHERE commit_ns < ?",
                (_TRIM_BATCH, cutoff),
            ).fetchone()
            if last is not None:
                conn.execute("DELETE FROM changes WHERE seq <= ?", (last,))
                conn.execute(
                    "UPDATE watch_meta SET value = max(value, ?) WHERE key = 'trimmed_through'",
                    (last,),
                )
            conn.execute("COMMIT")
            if last is None:
                return

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
                created = Task(item.task_id, c, now, now, now)
                _log_change(conn, item.task_id, now, None, created)
                results.append(created)
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
            updated = Task(task_id, content, current.create_time_ns, version, version)
            _log_change(conn, task_id, version, current, updated)
            return updated

        return await self._write(update, timeout)

    async def delete(self, task_id: str, expected_version: int | None, timeout: float) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            if expected_version is None:
                row = conn.execute(
                    f"DELETE FROM tasks WHERE task_id = ? RETURNING {_COLUMNS}", (task_id,)
                ).fetchone()
            else:
                row = conn.execute(
                    f"DELETE FROM tasks WHERE task_id = ? AND update_ns = ? RETURNING {_COLUMNS}",
                    (task_id, expected_version),
                ).fetchone()
            if row is None:
                exists = conn.execute(
                    "SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                if exists is None:
                    raise not_found(task_id)
                raise stale_etag(task_id)
            before = _row_to_task(row)
            _log_change(conn, task_id, self._next_version(before.version), before, None)

        await self._write(delete, timeout)

    async def list(self, query: ListQuery, timeout: float) -> ListResult:
        column = "create_ns" if query.ordering.field is OrderField.CREATE_TIME else "update_ns"
        direction = "DESC" if query.ordering.descending else "ASC"
        where, args = _where(query.filter)
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

    # -- WatchTasks ---------------------------------------------------------

    def _position(self, mode: int, seq: int, after_id: str = "") -> bytes:
        assert self._log_id is not None
        return _POSITION.pack(b"S", self._log_id, mode, seq) + after_id.encode()

    def _parse_position(self, raw: bytes, trimmed: int, head: int) -> tuple[int, int, str]:
        try:
            tag, log_id, mode, seq = _POSITION.unpack_from(raw)
            after_id = raw[_POSITION.size :].decode()
        except (struct.error, UnicodeDecodeError):
            raise _bad_token() from None
        if tag != b"S" or mode not in (_LIVE, _INITIAL):
            raise _bad_token()
        if log_id != self._log_id:  # whatever the two logs' lengths
            raise _bad_token("was issued by another database; list the tasks, then watch from now")
        if seq > head:
            raise _bad_token()
        if seq < trimmed:
            raise _expired("the change history after it has been trimmed")
        return mode, seq, after_id

    async def watch(self, query: WatchQuery) -> AsyncIterator[WatchEvent]:
        """The events of query.filter from the log (see the module docstring).

        Positions: (LIVE, seq) means every commit up to seq was seen;
        (INITIAL, seq, task_id) means the initial tasks as of seq were sent up
        to task_id, in task id order. Resuming inside an initial snapshot
        rebuilds the tasks as they were at seq from the log's `before`
        images, so the snapshot continues where it stopped."""
        f = query.filter

        def start(conn: sqlite3.Connection) -> tuple[bytes, int, int]:
            log_id = conn.execute("SELECT value FROM watch_meta WHERE key = 'log_id'").fetchone()
            trimmed = conn.execute(
                "SELECT value FROM watch_meta WHERE key = 'trimmed_through'"
            ).fetchone()
            head = conn.execute(_HEAD).fetchone()[0]
            return bytes.fromhex(log_id[0]), int(trimmed[0]), head

        log_id, trimmed, head = await self._read(start, 10.0)
        self._log_id = log_id
        if query.after is not None:
            mode, seq, after_id = self._parse_position(query.after, trimmed, head)
        else:
            mode, seq, after_id = (_INITIAL if query.include_initial else _LIVE), head, ""
        feed = self._feed
        if feed is None or feed.loop is not asyncio.get_running_loop():
            feed = self._feed = _ChangeFeed(self, head)
        feed.join()
        try:
            if mode == _INITIAL:
                snapshot = await self._read(lambda c: _tasks_at(c, f, seq, after_id), 30.0)
                for task in snapshot:
                    yield WatchEvent(
                        ChangeType.ADDED,
                        self._position(_INITIAL, seq, task.task_id),
                        task.update_time_ns,
                        task.task_id,
                        task,
                        catching_up=True,
                    )
            if mode == _INITIAL or query.after is None:
                yield WatchEvent(
                    ChangeType.CURRENT,
                    self._position(_LIVE, seq),
                    feed.checked_ns,
                    catching_up=True,
                )
            quiet_since = time.monotonic()
            caught_up = False  # until the log's end is reached once, events are a backlog
            while True:
                kept = feed.since(seq)
                if kept is None:

                    def read_log(conn: sqlite3.Connection, after: int = seq) -> list[_LoggedChange]:
                        return _log_after(conn, after)

                    changes = await self._read(read_log, 30.0)
                else:
                    changes = kept
                for change in changes:
                    seq = change.seq
                    event = event_for(f, change.before, change.after, change.commit_ns)
                    if event is None:
                        continue
                    yield WatchEvent(
                        event.type,
                        self._position(_LIVE, seq),
                        event.commit_time_ns,
                        event.task_id,
                        event.task,
                        event.reason,
                        catching_up=not caught_up,
                    )
                    quiet_since = time.monotonic()
                if changes:
                    continue
                caught_up = caught_up or seq >= head
                left = query.progress_seconds - (time.monotonic() - quiet_since)
                if left <= 0:
                    yield WatchEvent(
                        ChangeType.PROGRESS, self._position(_LIVE, seq), feed.checked_ns
                    )
                    quiet_since = time.monotonic()
                    continue
                await feed.wait(left)
        finally:
            feed.leave()

    def use_telemetry(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    async def close(self) -> None:
        if self._feed is not None and self._feed._task is not None:
            self._feed._task.cancel()
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


def _bad_token(problem: str = "is not a token this service issued") -> InvalidArgument:
    return InvalidArgument([("resume_token", problem)], reason="INVALID_RESUME_TOKEN")


def _expired(why: str) -> OutOfRange:
    return OutOfRange(
        f"the resume token can no longer be honoured ({why}); list the tasks again,"
        " then watch from now",
        reason="RESUME_TOKEN_EXPIRED",
    )


def _log_after(conn: sqlite3.Connection, seq: int) -> list[_LoggedChange]:
    """The next page of the log after seq; OUT_OF_RANGE if entries after seq
    have been trimmed since (a watcher that fell an hour behind)."""
    conn.execute("BEGIN")
    try:
        trimmed = conn.execute(
            "SELECT value FROM watch_meta WHERE key = 'trimmed_through'"
        ).fetchone()[0]
        if int(trimmed) > seq:
            raise _expired("the change history after it has been trimmed")
        rows = conn.execute(
            f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, _LOG_PAGE),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return [_logged(r) for r in rows]


def _tasks_at(conn: sqlite3.Connection, f: TaskFilter, seq: int, after_id: str) -> list[Task]:
    """The tasks matching f as they were when the log ended at seq, with ids
    after after_id, in id order: today's tasks, except that a task changed
    since is taken from its first later log entry's `before` image. One read
    transaction, so the tasks and the log agree."""
    where, args = _where(f)
    where.append("task_id > ?")
    args.append(after_id)
    conn.execute("BEGIN")
    try:
        trimmed = conn.execute(
            "SELECT value FROM watch_meta WHERE key = 'trimmed_through'"
        ).fetchone()[0]
        if int(trimmed) > seq:
            raise _expired("the change history after it has been trimmed")
        earlier: dict[str, str | None] = {}
        for task_id, before in conn.execute(
            "SELECT task_id, before FROM changes WHERE seq > ? ORDER BY seq", (seq,)
        ):
            earlier.setdefault(task_id, before)
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE {' AND '.join(where)}", args
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    tasks = {row[0]: _row_to_task(row) for row in rows if row[0] not in earlier}
    for task_id, before in earlier.items():
        if before is not None and task_id > after_id:
            task = _task_from_json(task_id, before)
            if matches(f, task.content):
                tasks[task_id] = task
    return [tasks[t] for t in sorted(tasks)]
