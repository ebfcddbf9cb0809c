"""The change log and WatchTasks on SQLite.

Every write appends to a change log in the same transaction (schema version
2): the task before and after, under a sequence number that orders every
commit of every process sharing the file. WatchTasks reads it, so a watch
resumes exactly after a restart; the writer trims entries older than the
retention (TASKSERVICE_WATCH_RETENTION_SECONDS). One ChangeFeed per process
tails the log for all of its watchers."""

from __future__ import annotations

import asyncio
import sqlite3
import struct
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeAlias

from taskservice.domain.changes import ChangeType, WatchEvent, WatchQuery, event_for, matches
from taskservice.domain.errors import InvalidArgument, OutOfRange
from taskservice.domain.model import Task, TaskFilter
from taskservice.store.sqlite._engine import SqliteEngine
from taskservice.store.sqlite._rows import (
    COLUMNS,
    row_to_task,
    task_from_json,
    task_json,
    where_of,
)

_CHANGE_COLUMNS = "seq, task_id, commit_ns, before, after"
# A row of those columns (before and after as task_json images, None where absent).
ChangeRow: TypeAlias = tuple[int, str, int, str | None, str | None]
# The head of the log: AUTOINCREMENT never reuses a number, even once trimmed.
_HEAD = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)"
# How often a watching process looks for commits by other processes on the
# same file (PRAGMA data_version); its own commits wake its watchers at once.
# 20 ms keeps another worker's events within the README's 50 ms at p99 (a
# 50 ms poll misses it for 7% of them); a poll is one PRAGMA, run only while
# the process has a watcher: 1.0% of a core for an idle process with one.
_POLL_SECONDS = 0.02
_FEED_KEEP = 4096  # recent log entries kept in memory for the watchers
_LOG_PAGE = 500  # log entries a watcher behind the kept ones reads at a time
# A resume position: b"S", the log's id, a mode, the sequence number, and for
# a position inside an initial snapshot the last task id sent.
_POSITION = struct.Struct(">c8sBQ")
_LIVE, _INITIAL = 1, 2


def log_change(
    conn: sqlite3.Connection, task_id: str, commit_ns: int, before: Task | None, after: Task | None
) -> None:
    conn.execute(
        "INSERT INTO changes (task_id, commit_ns, before, after) VALUES (?, ?, ?, ?)",
        (
            task_id,
            commit_ns,
            None if before is None else task_json(before),
            None if after is None else task_json(after),
        ),
    )


@dataclass(frozen=True, slots=True)
class LoggedChange:
    seq: int
    task_id: str
    commit_ns: int
    before: Task | None
    after: Task | None


def _logged(row: ChangeRow) -> LoggedChange:
    seq, task_id, commit_ns, before, after = row
    return LoggedChange(
        seq,
        task_id,
        commit_ns,
        None if before is None else task_from_json(task_id, before),
        None if after is None else task_from_json(task_id, after),
    )


class ChangeFeed:
    """The tail of the change log, read once for all the watchers of one
    process: woken at once by this process's commits, and every _POLL_SECONDS
    by PRAGMA data_version for those of other processes on the file. Keeps
    the last _FEED_KEEP entries; a watcher further behind reads the log."""

    def __init__(self, engine: SqliteEngine, head: int) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.recent: deque[LoggedChange] = deque()
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

    def poke_threadsafe(self) -> None:
        """From the writer thread, after a commit: wakes the feed while anyone watches."""
        if self.watchers > 0:
            self.loop.call_soon_threadsafe(self.poke)

    def join(self) -> None:
        self.watchers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow())

    def leave(self) -> None:
        self.watchers -= 1

    def since(self, seq: int) -> list[LoggedChange] | None:
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
        def read(conn: sqlite3.Connection) -> tuple[int, list[ChangeRow]]:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return version, []
            return version, conn.execute(
                f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (self.head, _LOG_PAGE),
            ).fetchall()

        while True:
            version, rows = await self.engine.read(read, 5.0)
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


class ChangeLog:
    """The watches of one store: positions in its log, and the events."""

    def __init__(self, engine: SqliteEngine) -> None:
        self.engine = engine
        self._feed: ChangeFeed | None = None
        self._log_id: bytes | None = None

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

        log_id, trimmed, head = await self.engine.read(start, 10.0)
        self._log_id = log_id
        if query.after is not None:
            mode, seq, after_id = self._parse_position(query.after, trimmed, head)
        else:
            mode, seq, after_id = (_INITIAL if query.include_initial else _LIVE), head, ""
        feed = self._feed
        if feed is None or feed.loop is not asyncio.get_running_loop():
            feed = self._feed = ChangeFeed(self.engine, head)
            self.engine.on_commit = feed.poke_threadsafe
        feed.join()
        try:
            if mode == _INITIAL:
                snapshot = await self.engine.read(lambda c: _tasks_at(c, f, seq, after_id), 30.0)
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

                    def read_log(conn: sqlite3.Connection, after: int = seq) -> list[LoggedChange]:
                        return _log_after(conn, after)

                    changes = await self.engine.read(read_log, 30.0)
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

    def close(self) -> None:
        if self._feed is not None and self._feed._task is not None:
            self._feed._task.cancel()


def _bad_token(problem: str = "is not a token this service issued") -> InvalidArgument:
    return InvalidArgument([("resume_token", problem)], reason="INVALID_RESUME_TOKEN")


def _expired(why: str) -> OutOfRange:
    return OutOfRange(
        f"the resume token can no longer be honoured ({why}); list the tasks again,"
        " then watch from now",
        reason="RESUME_TOKEN_EXPIRED",
    )


def _log_after(conn: sqlite3.Connection, seq: int) -> list[LoggedChange]:
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
    where, args = where_of(f)
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
            f"SELECT {COLUMNS} FROM tasks WHERE {' AND '.join(where)}", args
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    tasks = {row[0]: row_to_task(row) for row in rows if row[0] not in earlier}
    for task_id, before in earlier.items():
        if before is not None and task_id > after_id:
            task = task_from_json(task_id, before)
            if matches(f, task.content):
                tasks[task_id] = task
    return [tasks[t] for t in sorted(tasks)]
