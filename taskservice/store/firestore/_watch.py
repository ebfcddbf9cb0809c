"""WatchTasks on Firestore: positions, exact resumes from Firestore's reads
in the past, and each watcher's live loop over the shared Listen stream
(taskservice.store.firestore._hub).

A position is (base, at, task id): every change up to read time `base` was
delivered, and of the changes between the views at `base` and at `at`, those
up to that task id (base 0: the initial tasks as of `at`). Any instance can
resume one exactly: it reads both views with RunQuery at those read times
(Firestore keeps an hour of versions), recomputes the same changes, skips
the delivered ones, then diffs the view at `at` against its own latest
snapshot and follows the chain from there. A resume thus costs reads of the
matching tasks, once or twice; a watch on a filter this process already
follows costs nothing more.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import AsyncIterator, Iterable, Mapping

from taskservice.domain.changes import Change, ChangeType, WatchEvent, WatchQuery, diff
from taskservice.domain.errors import InvalidArgument, OutOfRange
from taskservice.domain.model import Task
from taskservice.store.firestore._hub import HEARTBEAT_MIN_SECONDS, ListenHub, Snapshot
from taskservice.store.firestore._rpc import FirestoreRpc

_POSITION = struct.Struct(">c8sqq")  # b"F", the store's identity, base, at
_HEARTBEAT_LEAD_SECONDS = 5.0  # how long before a PROGRESS event a heartbeat is written
# Firestore's read times are whole microseconds (the emulator's, milliseconds).
_READ_TIME_STEP_NS = 1000
# How far ahead of this clock a position's time may be: a read time is
# Firestore's clock, which Cloud Run's (synchronised by Google) trails by far
# less. A resume waits until its time has passed here before reading at it.
_FUTURE_SLACK_NS = 2 * 10**9


def identity(database: str, collection: str) -> bytes:
    return hashlib.blake2b(f"{database}/{collection}".encode(), digest_size=8).digest()


def _expired(why: str) -> OutOfRange:
    return OutOfRange(
        f"the resume token can no longer be honoured ({why}); list the tasks again,"
        " then watch from now",
        reason="RESUME_TOKEN_EXPIRED",
    )


def _bad_token(problem: str = "is not a token this service issued") -> InvalidArgument:
    return InvalidArgument([("resume_token", problem)], reason="INVALID_RESUME_TOKEN")


class FirestoreWatcher:
    """FirestoreStore.watch: positions, resumes and the live loop of one watcher."""

    def __init__(
        self, rpc: FirestoreRpc, retention_seconds: float, *, verify_listen: bool = False
    ) -> None:
        self.rpc = rpc
        self.verify_listen = verify_listen
        self.identity = identity(rpc.collection.database, rpc.collection.collection)
        self.retention_ns = int(retention_seconds * 1e9)
        self._hub: ListenHub | None = None

    def hub(self) -> ListenHub:
        if self._hub is None or self._hub.ended:
            self._hub = ListenHub(self.rpc, self.verify_listen)
        return self._hub

    async def close(self) -> None:
        if self._hub is not None:
            await self._hub.close()

    def position(self, base_ns: int, at_ns: int, after_id: str = "") -> bytes:
        return _POSITION.pack(b"F", self.identity, base_ns, at_ns) + after_id.encode()

    def parse(self, raw: bytes) -> tuple[int, int, str]:
        """(base, at, task id) of a position this store could have issued;
        INVALID_ARGUMENT for any other (another database or collection, a
        time that is no Firestore read time: not whole microseconds, or
        ahead of this clock by more than _FUTURE_SLACK_NS), OUT_OF_RANGE
        for one older than the history kept."""
        try:
            tag, ident, base_ns, at_ns = _POSITION.unpack_from(raw)
            after_id = raw[_POSITION.size :].decode()
        except (struct.error, UnicodeDecodeError):
            raise _bad_token() from None
        now = time.time_ns()
        if tag != b"F":
            raise _bad_token()
        if ident != self.identity:
            raise _bad_token("was issued by another database or collection; list the tasks again")
        if (
            not 0 <= base_ns <= at_ns <= now + _FUTURE_SLACK_NS
            or base_ns % _READ_TIME_STEP_NS
            or at_ns % _READ_TIME_STEP_NS
        ):
            raise _bad_token()
        if now - (base_ns or at_ns) > self.retention_ns:
            raise _expired("it is older than the hour of history Firestore keeps")
        return base_ns, at_ns, after_id

    def _events(
        self,
        changes: Iterable[Change],
        base_ns: int,
        at_ns: int,
        after_id: str = "",
        *,
        catching_up: bool = False,
    ) -> Iterable[WatchEvent]:
        for c in changes:
            if c.task_id > after_id:
                yield WatchEvent(
                    c.type,
                    self.position(base_ns, at_ns, c.task_id),
                    c.commit_time_ns,
                    c.task_id,
                    c.task,
                    c.reason,
                    catching_up=catching_up,
                )

    async def watch(self, query: WatchQuery) -> AsyncIterator[WatchEvent]:
        f = query.filter
        resume = self.parse(query.after) if query.after is not None else None
        hub = self.hub()
        target = hub.subscribe(f)
        try:
            if resume is None:
                snapshot = await target.snapshot()
                view = snapshot.view
                assert view is not None
                if query.include_initial:
                    initial = diff({}, view, removed_as={}, snapshot_ns=snapshot.at_ns)
                    for event in self._events(initial, 0, snapshot.at_ns, catching_up=True):
                        yield event
                yield WatchEvent(
                    ChangeType.CURRENT,
                    self.position(snapshot.at_ns, snapshot.at_ns),
                    snapshot.at_ns,
                    catching_up=True,
                )
            else:
                # Replay what the position says is left of its interval, then
                # catch up from its end to this process's latest snapshot.
                base_ns, at_ns, after_id = resume
                ahead_ns = at_ns - time.time_ns()
                if ahead_ns > 0:  # at most _FUTURE_SLACK_NS: not a time to read at yet
                    await asyncio.sleep(ahead_ns / 1e9 + 0.01)
                view = await self.rpc.view_at(f, at_ns)
                if base_ns != at_ns:
                    old = await self.rpc.view_at(f, base_ns) if base_ns else {}
                    changes = await self._diff(old, view, at_ns)
                    for event in self._events(changes, base_ns, at_ns, after_id, catching_up=True):
                        yield event
                    if base_ns == 0:
                        yield WatchEvent(
                            ChangeType.CURRENT,
                            self.position(at_ns, at_ns),
                            at_ns,
                            catching_up=True,
                        )
                snapshot = await target.snapshot()
                while snapshot.at_ns < at_ns:  # this process is behind the token
                    hub.heartbeat()
                    await asyncio.wait_for(asyncio.shield(snapshot.next), 30)
                    snapshot = await target.snapshot()
                latest = snapshot.view
                assert latest is not None
                changes = await self._diff(view, latest, snapshot.at_ns)
                for event in self._events(changes, at_ns, snapshot.at_ns, catching_up=True):
                    yield event
            async for event in self._follow(hub, snapshot, query.progress_seconds):
                yield event
        finally:
            hub.unsubscribe(target)

    async def _diff(
        self, old: Mapping[str, Task], new: Mapping[str, Task], at_ns: int
    ) -> list[Change]:
        removed = [t for t in old if t not in new]
        removed_as = await self.rpc.tasks_at(removed, at_ns) if removed else {}
        return diff(old, new, removed_as=removed_as, snapshot_ns=at_ns)

    async def _follow(
        self, hub: ListenHub, snapshot: Snapshot, progress_seconds: float
    ) -> AsyncIterator[WatchEvent]:
        """Live events, and when there are none for progress_seconds a
        PROGRESS event at a fresh snapshot: one received at most `lead`
        before it is due, or else the one the heartbeat asks for, waited for
        up to `patience` past due. Only if Firestore makes none in time does
        PROGRESS repeat the last position."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        lead = min(_HEARTBEAT_LEAD_SECONDS, progress_seconds / 2)
        every = min(HEARTBEAT_MIN_SECONDS, lead)
        patience = max(lead, 2.0)  # how long past due PROGRESS waits for a snapshot
        fresh_at = loop.time()  # when `snapshot` was received
        while True:
            now = loop.time()
            due = quiet_since + progress_seconds
            if now >= due and fresh_at >= due - lead:
                yield WatchEvent(
                    ChangeType.PROGRESS,
                    self.position(snapshot.at_ns, snapshot.at_ns),
                    snapshot.at_ns,
                )
                quiet_since = now
                continue
            if now < due - lead:
                until = due - lead
            elif fresh_at >= due - lead:
                until = due
            else:  # ask Firestore for a snapshot; wait for it up to `patience` past due
                hub.heartbeat(every)
                until = due + patience
            try:
                nxt = await asyncio.wait_for(asyncio.shield(snapshot.next), max(0.0, until - now))
            except TimeoutError:
                if until == due + patience:  # none came: the stream is alive all the same
                    yield WatchEvent(
                        ChangeType.PROGRESS,
                        self.position(snapshot.at_ns, snapshot.at_ns),
                        snapshot.at_ns,
                    )
                    quiet_since = loop.time()
                continue
            events = list(self._events(nxt.changes, nxt.base_ns, nxt.at_ns))
            for event in events:
                yield event
            snapshot = nxt
            fresh_at = loop.time()
            if events:
                quiet_since = fresh_at
