"""The SQLite engine: one file in WAL mode, its schema and migrations, one
writer thread that group-commits every write waiting (each in its own
SAVEPOINT, one fsync for all), reads on the event loop's own connection with
a small reader pool behind it, and the trimming of the change log. Versions
are whole microseconds, each strictly greater than the previous one."""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeVar, cast

from taskservice.domain.deadlines import Deadlines
from taskservice.domain.errors import DeadlineExceeded, Unavailable
from taskservice.domain.model import VERSION_STEP_NS

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
_READ_THREADS = 2
_GROUP_MAX = 256  # writes committed together at most
_TRIM_EVERY_SECONDS = 10.0
_TRIM_BATCH = 10_000  # log entries deleted per transaction


@dataclass(slots=True)
class _WriteOp:
    fn: Callable[[sqlite3.Connection], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[object]
    # The group commit that carried it (started_ns, ended_ns, writes, ok),
    # set by the writer when telemetry is on.
    commit: tuple[int, int, int, bool] | None = None


# A write's outcome: (op, True, fn's result) or (op, False, the exception).
_Outcome: TypeAlias = tuple[_WriteOp, bool, object]


def _settle_all(results: list[_Outcome]) -> None:
    for op, ok, value in results:
        if op.future.done():  # the caller gave up
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(cast(BaseException, value))


def _time_out(future: asyncio.Future[object]) -> None:
    """A write its caller waited for too long: the writer skips it if it has
    not started it yet."""
    if not future.done():
        future.set_exception(DeadlineExceeded("the store did not answer in time"))


def now_version() -> int:
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


def next_version(previous_ns: int) -> int:
    """The version of a write after one at previous_ns."""
    return max(now_version(), previous_ns + VERSION_STEP_NS)


class SqliteEngine:
    """The writer thread, the readers, and the connections of one file."""

    def __init__(self, path: str | Path, watch_retention_seconds: float = 3600.0) -> None:
        self.path = str(path)
        self.watch_retention_ns = int(watch_retention_seconds * 1e9)
        self._trim_every = min(_TRIM_EVERY_SECONDS, watch_retention_seconds / 2)
        self.telemetry: Telemetry | None = None
        # Called on the writer thread after each group of writes.
        self.on_commit: Callable[[], None] | None = None
        self._trimmed_at = 0.0
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writes: queue.SimpleQueue[_WriteOp | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="sqlite-read")
        self._loop_conn: sqlite3.Connection | None = None
        self._ready = False
        # The writes each event loop waits for, on one timer per loop.
        self._waits: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, Deadlines[asyncio.Future[object]]
        ] = weakref.WeakKeyDictionary()

    def open(self, busy_timeout_ms: int) -> sqlite3.Connection:
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
            conn = self._local.conn = self.open(10_000)
        return conn

    async def write(self, fn: Callable[[sqlite3.Connection], T], timeout: float) -> T:
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
        future: asyncio.Future[object] = loop.create_future()
        op = _WriteOp(fn, loop, future)
        self._writes.put(op)
        waits = self._waits.get(loop)
        if waits is None:
            waits = self._waits[loop] = Deadlines(_time_out)
        waits.add(future, loop.time() + timeout, loop)
        try:
            return cast(T, await future)  # fn's result
        finally:
            waits.discard(future)
            telemetry = self.telemetry
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
            outcomes: list[_Outcome] = []
            started_ns = time.time_ns()
            committed = False
            try:
                if conn is None:
                    conn = self.open(10_000)
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
            telemetry = self.telemetry
            if telemetry is not None:
                ended_ns = time.time_ns()
                telemetry.sqlite_group(len(group), (ended_ns - started_ns) / 1e9, committed)
                for op in group:
                    op.commit = (started_ns, ended_ns, len(group), committed)
            settled: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
            for op, ok, value in outcomes:
                if not ok and isinstance(value, sqlite3.Error):
                    unavailable = Unavailable("the task database is unavailable")
                    unavailable.__cause__ = value
                    value = unavailable
                settled.setdefault(op.loop, []).append((op, ok, value))
            # One wake-up of the loop per group, not one per write.
            for loop, results in settled.items():
                loop.call_soon_threadsafe(_settle_all, results)
            hook = self.on_commit
            if hook is not None:
                hook()
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

    async def read(self, fn: Callable[[sqlite3.Connection], T], timeout: float) -> T:
        """Runs fn on the event loop's own connection: WAL readers never wait
        for the writer, and a point read costs less than a hop to a thread.
        If the file is busy anyway (recovery, a checkpoint), the read moves to
        the reader pool, which waits."""
        if not self._ready:
            await self.write(lambda conn: None, timeout)  # the writer creates the schema
        try:
            if self._loop_conn is None:
                self._loop_conn = self.open(0)
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
