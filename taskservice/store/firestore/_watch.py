"""WatchTasks on Firestore: one Listen stream per process, shared by every
watcher, and exact resumes from Firestore's reads in the past.

ListenHub keeps one Firestore Listen stream open on a channel of its own (a
connection carries at most 100 streams, so one per watcher would not scale,
and sharing the store's connection would queue its other calls behind the
stream), with one query target per distinct
filter, shared by every watcher of that filter and kept a while after the
last one leaves, so that reconnecting watchers do not pay for a new target.
At every consistent snapshot Firestore announces (a global NO_CHANGE with a
read time), each target's new view of the matching tasks is compared with
the previous one (taskservice.domain.changes.diff); the changes, in task id order,
are published once as a _Snapshot that links to the next, and each watcher
follows the chain. A task that left a view is told apart (deleted, or
changed so that it no longer matches) from what Listen said about it, or
else by one BatchGetDocuments at the snapshot's read time.

A position is (base, at, task id): every change up to read time `base` was
delivered, and of the changes between the views at `base` and at `at`, those
up to that task id (base 0: the initial tasks as of `at`). Any instance can
resume one exactly: it reads both views with RunQuery at those read times
(Firestore keeps an hour of versions), recomputes the same changes, skips
the delivered ones, then diffs the view at `at` against its own latest
snapshot and follows the chain from there. A resume thus costs reads of the
matching tasks, once or twice; a watch on a filter this process already
follows costs nothing more.

Firestore's own resume tokens carry the shared stream across reconnects (a
target re-added with its token gets only what changed since); when Firestore
answers with a RESET instead (the emulator always does), the full set it
sends is diffed like any other snapshot. When nothing changes, Firestore may
announce no snapshot at all, so a watcher due a PROGRESS event asks the hub
to write a heartbeat document that the stream also listens to: its commit
makes a fresh consistent snapshot (one small write per idle progress
interval per process, only while watchers are idle).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import struct
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.cloud.firestore_v1.types import firestore as _firestore

from taskservice.domain.changes import Change, ChangeType, WatchEvent, WatchQuery, diff
from taskservice.domain.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    OutOfRange,
    ServiceError,
    Unavailable,
)
from taskservice.domain.model import ListQuery, Task, TaskFilter
from taskservice.domain.retry import Backoff

if TYPE_CHECKING:
    from taskservice.store.firestore import FirestoreStore

ListenRequest: Any = _firestore.ListenRequest.pb()
ListenResponse: Any = _firestore.ListenResponse.pb()
TargetChange: Any = _firestore.TargetChange.pb()
Target: Any = _firestore.Target.pb()

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.store.firestore_watch")

_POSITION = struct.Struct(">c8sqq")  # b"F", the store's identity, base, at
_HEARTBEAT_TARGET = 1
_HEARTBEATS = 16  # heartbeat documents; each process listens to one of them
_HEARTBEAT_MIN_SECONDS = 5.0  # at most one heartbeat write per process this often
_HEARTBEAT_LEAD_SECONDS = 5.0  # how long before a PROGRESS event it is written
TARGET_LINGER_SECONDS = 30.0  # a target with no watcher left is kept this long
_RECONNECT = Backoff(first=0.1, maximum=5.0)  # no bound: as long as the hub runs
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
_DELETED = object()  # a removal hint: Listen said the document was deleted
# Firestore's read times are whole microseconds (the emulator's, milliseconds).
_READ_TIME_STEP_NS = 1000
# How far ahead of this clock a position's time may be: a read time is
# Firestore's clock, which Cloud Run's (synchronised by Google) trails by far
# less. A resume waits until its time has passed here before reading at it.
_FUTURE_SLACK_NS = 2 * 10**9


class _Corrupt(Exception):
    """A Listen response that did not parse."""


def identity(database: str, collection: str) -> bytes:
    return hashlib.blake2b(f"{database}/{collection}".encode(), digest_size=8).digest()


@dataclass(eq=False)
class _Snapshot:
    """The matching tasks of one target at read time `at_ns`, and the changes
    from the previous snapshot (at base_ns)."""

    base_ns: int
    at_ns: int
    view: Mapping[str, Task] | None  # kept on a target's latest snapshot only
    changes: list[Change]
    next: asyncio.Future[_Snapshot] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(eq=False)
class _Queued:
    """A consistent snapshot of one target, waiting to be published."""

    read_ns: int
    reset: bool
    pending: dict[str, Task | None]
    hints: dict[str, Any]


@dataclass(eq=False)
class _Target:
    target_id: int
    filter: TaskFilter
    query: Any  # StructuredQuery
    watchers: int = 0
    current: bool = False
    reset: bool = True  # pending holds the whole matching set (a new target, a RESET)
    resume_token: bytes = b""
    pending: dict[str, Task | None] = field(default_factory=dict)
    hints: dict[str, Any] = field(default_factory=dict)  # task id -> Task or _DELETED
    latest: _Snapshot | None = None
    first: asyncio.Future[_Snapshot] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    failed: BaseException | None = None
    linger: asyncio.TimerHandle | None = None
    queued: _Queued | None = None  # a snapshot waiting for the publisher

    async def snapshot(self) -> _Snapshot:
        """The latest snapshot; waits for the first one."""
        if self.latest is not None:
            return self.latest
        return await asyncio.shield(self.first)

    def fail(self, error: BaseException) -> None:
        self.failed = error
        if not self.first.done():
            self.first.set_exception(error)
            self.first.exception()  # retrieved: no "never retrieved" warning
        if self.latest is not None and not self.latest.next.done():
            self.latest.next.set_exception(error)
            self.latest.next.exception()


def _expired(why: str) -> OutOfRange:
    return OutOfRange(
        f"the resume token can no longer be honoured ({why}); list the tasks again,"
        " then watch from now",
        reason="RESUME_TOKEN_EXPIRED",
    )


def _bad_token(problem: str = "is not a token this service issued") -> InvalidArgument:
    return InvalidArgument([("resume_token", problem)], reason="INVALID_RESUME_TOKEN")


def _differs(
    accurate: Mapping[str, Task],
    old: Mapping[str, Task],
    pending: Mapping[str, Task | None],
    reset: bool,
) -> int:
    """1 when the view Listen described differs from the accurate one."""
    described = {} if reset else {k: v.version for k, v in old.items()}
    for task_id, task in pending.items():
        if task is None:
            described.pop(task_id, None)
        else:
            described[task_id] = task.version
    return int(described != {k: v.version for k, v in accurate.items()})


class ListenHub:
    """The process's one Listen stream and its targets (see the module docstring)."""

    def __init__(self, store: FirestoreStore) -> None:
        self.store = store
        self._listen = store._listen_channel.stream_stream(
            "/google.firestore.v1.Firestore/Listen",
            request_serializer=ListenRequest.SerializeToString,
            response_deserializer=ListenResponse.FromString,
        )
        self._targets: dict[int, _Target] = {}
        self._by_filter: dict[TaskFilter, _Target] = {}
        self._next_id = _HEARTBEAT_TARGET + 1
        self._outbox: asyncio.Queue[Any] | None = None
        self._snapshots: asyncio.Queue[_Target] = asyncio.Queue()
        self._heartbeat_name = (
            f"{store.documents}/{store.collection}-watch/heartbeat-{random.randrange(_HEARTBEATS)}"
        )
        self._heartbeat_at = 0.0
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._reported = 0.0
        self.corrections = 0  # emulator snapshots whose data lagged their read time
        self._stream = asyncio.create_task(self._run())
        self._publisher = asyncio.create_task(self._publish_all())

    # -- watchers ----------------------------------------------------------

    def subscribe(self, task_filter: TaskFilter) -> _Target:
        target = self._by_filter.get(task_filter)
        if target is None or target.failed is not None:
            query = self.store.build_query(ListQuery(filter=task_filter))
            query.ClearField("limit")
            target = _Target(self._take_id(), task_filter, query)
            self._by_filter[task_filter] = target
            self._targets[target.target_id] = target
            self._send_add(target)
        if target.linger is not None:
            target.linger.cancel()
            target.linger = None
        target.watchers += 1
        return target

    def unsubscribe(self, target: _Target) -> None:
        target.watchers -= 1
        if target.watchers == 0 and target.failed is None:
            loop = asyncio.get_running_loop()
            target.linger = loop.call_later(TARGET_LINGER_SECONDS, self._drop, target)
        elif target.watchers == 0:
            self._drop(target)

    def _drop(self, target: _Target) -> None:
        if target.watchers > 0:
            return
        if self._by_filter.get(target.filter) is target:
            del self._by_filter[target.filter]
        if self._targets.pop(target.target_id, None) is not None and self._outbox is not None:
            self._outbox.put_nowait(
                ListenRequest(database=self.store.database, remove_target=target.target_id)
            )

    def heartbeat(self, every: float = _HEARTBEAT_MIN_SECONDS) -> None:
        """Asks for a fresh consistent snapshot: writes the heartbeat document
        (at most once every `every` seconds, and one write at a time)."""
        now = time.monotonic()
        if now - self._heartbeat_at < every:
            return
        if self._heartbeat_task is not None and not self._heartbeat_task.done():
            return
        self._heartbeat_at = now
        self._heartbeat_task = asyncio.create_task(self._write_heartbeat())

    async def close(self) -> None:
        for task in (self._stream, self._publisher, self._heartbeat_task):
            if task is not None:
                task.cancel()
        closed = Unavailable("the task store is shutting down; reconnect")
        for target in list(self._targets.values()):
            target.fail(closed)

    # -- the Listen stream ---------------------------------------------------

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _send_add(self, target: _Target) -> None:
        if self._outbox is None:
            return  # sent when the stream (re)connects
        self._outbox.put_nowait(self._add_request(target))

    def _add_request(self, target: _Target) -> Any:
        spec = Target(target_id=target.target_id)
        spec.query.parent = self.store.documents
        spec.query.structured_query.CopyFrom(target.query)
        if target.resume_token:
            spec.resume_token = target.resume_token
        return ListenRequest(database=self.store.database, add_target=spec)

    def _heartbeat_request(self) -> Any:
        spec = Target(target_id=_HEARTBEAT_TARGET)
        spec.documents.documents.append(self._heartbeat_name)
        return ListenRequest(database=self.store.database, add_target=spec)

    async def _write_heartbeat(self) -> None:
        from taskservice.store.firestore import _REQUEST_TIME, FieldTransform, Write

        write = Write(
            update=self.store.document(self._heartbeat_name, {}),
            update_transforms=[
                FieldTransform(field_path="beat_time", set_to_server_value=_REQUEST_TIME)
            ],
        )
        try:
            await self.store._commit_writes([write], 10.0)
        except grpc.aio.AioRpcError as exc:
            self._report(f"the watch heartbeat write failed: {exc.code().name}")

    def _report(self, message: str) -> None:
        """Logs a trouble of the shared stream at most once a minute."""
        if time.monotonic() - self._reported > 60:
            self._reported = time.monotonic()
            log.warning(message)

    async def _run(self) -> None:
        pauses = _RECONNECT.pauses()
        while True:
            outbox: asyncio.Queue[Any] = asyncio.Queue()
            outbox.put_nowait(self._heartbeat_request())
            for target in self._targets.values():
                target.current = False
                outbox.put_nowait(self._add_request(target))
            self._outbox = outbox

            async def requests(box: asyncio.Queue[Any] = outbox) -> AsyncIterator[Any]:
                while True:
                    yield await box.get()

            call = self._listen(requests(), metadata=self.store._metadata)
            try:
                async for response in call:
                    if response is None:  # gRPC could not parse it: start over
                        raise _Corrupt
                    pauses = _RECONNECT.pauses()  # the stream answered: start over
                    self._on_response(response)
                code = grpc.StatusCode.UNAVAILABLE  # Firestore ended the stream
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in _TRANSIENT:
                    from taskservice.store.firestore import _store_error

                    error = _store_error(exc)
                    for target in list(self._targets.values()):
                        target.fail(error)
                    self._targets.clear()
                    self._by_filter.clear()
            except Exception as exc:  # unparsable, or not understood: start over
                if not isinstance(exc, _Corrupt):
                    log.exception("a Firestore Listen response could not be handled")
                code = grpc.StatusCode.DATA_LOSS
                for target in self._targets.values():
                    target.resume_token = b""  # the stream's state is in doubt: all again
                    target.reset = True
                    target.pending.clear()
            finally:
                self._outbox = None
                call.cancel()
            self._report(f"the Firestore Listen stream ended ({code.name}); reconnecting")
            await asyncio.sleep(next(pauses))

    def _on_response(self, response: Any) -> None:
        kind = response.WhichOneof("response_type")
        if kind == "target_change":
            self._on_target_change(response.target_change)
        elif kind == "document_change":
            change = response.document_change
            if not change.document.name.startswith(self.store._task_prefix):
                return  # the heartbeat
            from taskservice.store.firestore import _task

            task = _task(change.document)
            for tid in change.target_ids:
                target = self._targets.get(tid)
                if target is not None:
                    target.pending[task.task_id] = task
            for tid in change.removed_target_ids:
                target = self._targets.get(tid)
                if target is not None:
                    target.pending[task.task_id] = None
                    target.hints[task.task_id] = task
        elif kind in ("document_delete", "document_remove"):
            change = getattr(response, kind)
            task_id = change.document.rpartition("/")[2]
            for tid in change.removed_target_ids:
                target = self._targets.get(tid)
                if target is not None:
                    target.pending[task_id] = None
                    if kind == "document_delete":
                        target.hints[task_id] = _DELETED
        elif kind == "filter":
            target = self._targets.get(response.filter.target_id)
            if target is not None and target.current and not target.reset:
                ids = set((target.latest.view or {}) if target.latest else ())
                for task_id, now in target.pending.items():
                    if now is None:
                        ids.discard(task_id)
                    else:
                        ids.add(task_id)
                if len(ids) != response.filter.count:
                    self._relisten(target)

    def _relisten(self, target: _Target) -> None:
        """Starts the target afresh (Firestore's count disagrees with ours)."""
        self._targets.pop(target.target_id, None)
        if self._outbox is not None:
            self._outbox.put_nowait(
                ListenRequest(database=self.store.database, remove_target=target.target_id)
            )
        target.target_id = self._take_id()
        target.resume_token = b""
        target.current = False
        target.reset = True
        target.pending.clear()
        self._targets[target.target_id] = target
        self._send_add(target)

    def _on_target_change(self, change: Any) -> None:
        ids = list(change.target_ids)
        targets = [self._targets[i] for i in ids if i in self._targets] if ids else []
        kind = change.target_change_type
        if change.HasField("cause") and change.cause.code != 0:
            log.error(
                "Firestore refused a watch target: code %d: %s",
                change.cause.code,
                change.cause.message[:500],
            )
            error = Internal("the task store refused the watch", reason="STORE_REJECTED")
            for target in targets or list(self._targets.values()):
                target.fail(error)
                self._targets.pop(target.target_id, None)
                if self._by_filter.get(target.filter) is target:
                    del self._by_filter[target.filter]
            return
        if kind == TargetChange.RESET:
            for target in targets:
                target.current = False
                target.reset = True
                target.pending.clear()
        elif kind == TargetChange.CURRENT:
            for target in targets:
                target.current = True
        if change.resume_token:
            for target in targets or self._targets.values():
                target.resume_token = change.resume_token
        if kind == TargetChange.NO_CHANGE and not ids and change.HasField("read_time"):
            self._on_consistent(change.read_time.ToNanoseconds())

    def _on_consistent(self, read_ns: int) -> None:
        """Every current target is consistent at read_ns: queue its snapshot.
        A target whose previous snapshot is still waiting to be published
        (the publisher is behind) has this one merged into it."""
        for target in self._targets.values():
            if not target.current or target.failed is not None:
                continue
            pending, target.pending = target.pending, {}
            hints, target.hints = target.hints, {}
            reset, target.reset = target.reset, False
            queued = target.queued
            if queued is None:
                target.queued = _Queued(read_ns, reset, pending, hints)
                self._snapshots.put_nowait(target)
                continue
            queued.read_ns = read_ns
            if reset:
                queued.reset, queued.pending = True, pending
            else:
                queued.pending.update(pending)
            queued.hints.update(hints)

    async def _publish_all(self) -> None:
        while True:
            target = await self._snapshots.get()
            queued, target.queued = target.queued, None
            if target.failed is not None or queued is None:
                continue
            try:
                snapshot = await self._snapshot(
                    target, queued.read_ns, queued.reset, queued.pending, queued.hints
                )
            except (Unavailable, DeadlineExceeded) as error:
                # Reading the past failed for now: start the target afresh; its
                # next snapshot is diffed against the last one published.
                self._report(f"a watch snapshot could not be completed ({error}); relistening")
                self._relisten(target)
                continue
            except ServiceError as error:
                target.fail(error)
                self._targets.pop(target.target_id, None)
                if self._by_filter.get(target.filter) is target:
                    del self._by_filter[target.filter]
                continue
            self._publish(target, snapshot)

    async def _snapshot(
        self,
        target: _Target,
        read_ns: int,
        reset: bool,
        pending: dict[str, Task | None],
        hints: dict[str, Any],
    ) -> _Snapshot:
        old: Mapping[str, Task] = (target.latest.view or {}) if target.latest is not None else {}
        base_ns = target.latest.at_ns if target.latest is not None else 0
        if not reset and not pending and not self.store.verify_listen:
            return _Snapshot(base_ns, read_ns, old, [])
        if self.store.verify_listen:
            # The emulator stamps a snapshot with a read time later than the
            # data it holds (by ~0.1 ms, in 11 of 160 snapshots under 16
            # writers); Firestore promises the data is consistent at it.
            # There, read the view at that time instead, so that what
            # positions mean is what a resume reads anywhere.
            new = await self.store.view_at(target.filter, read_ns)
            self.corrections += _differs(new, old, pending, reset)
        elif reset:
            new = {k: v for k, v in pending.items() if v is not None}
        else:
            new = dict(old)
            for task_id, task in pending.items():
                if task is None:
                    new.pop(task_id, None)
                else:
                    new[task_id] = task
        if target.latest is None:  # the first snapshot: nothing to compare with
            return _Snapshot(0, read_ns, new, [])
        removed = [t for t in old if t not in new]
        if self.store.verify_listen:
            hints = {}  # Listen's word on them may lag too: read them at read_ns
        removed_as = await self.store.tasks_at([t for t in removed if t not in hints], read_ns)
        for task_id in removed:
            hint = hints.get(task_id)
            if hint is _DELETED:
                removed_as[task_id] = None
            elif hint is not None:
                removed_as[task_id] = hint
        changes = diff(old, new, removed_as=removed_as, snapshot_ns=read_ns)
        return _Snapshot(base_ns, read_ns, new, changes)

    def _publish(self, target: _Target, snapshot: _Snapshot) -> None:
        """Links the snapshot after the latest one. Only the latest keeps its
        view: a watcher far behind holds changes, not copies of the view."""
        previous, target.latest = target.latest, snapshot
        if previous is None:
            target.first.set_result(snapshot)
        else:
            previous.next.set_result(snapshot)
            previous.view = None


class FirestoreWatcher:
    """FirestoreStore.watch: positions, resumes and the live loop of one watcher."""

    def __init__(self, store: FirestoreStore, retention_seconds: float) -> None:
        self.store = store
        self.identity = identity(store.database, store.collection)
        self.retention_ns = int(retention_seconds * 1e9)
        self._hub: ListenHub | None = None

    def hub(self) -> ListenHub:
        if self._hub is None or self._hub._stream.done():
            self._hub = ListenHub(self.store)
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
                view = await self.store.view_at(f, at_ns)
                if base_ns != at_ns:
                    old = await self.store.view_at(f, base_ns) if base_ns else {}
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
        removed_as = await self.store.tasks_at(removed, at_ns) if removed else {}
        return diff(old, new, removed_as=removed_as, snapshot_ns=at_ns)

    async def _follow(
        self, hub: ListenHub, snapshot: _Snapshot, progress_seconds: float
    ) -> AsyncIterator[WatchEvent]:
        """Live events, and when there are none for progress_seconds a
        PROGRESS event at a fresh snapshot: one received at most `lead`
        before it is due, or else the one the heartbeat asks for, waited for
        up to `patience` past due. Only if Firestore makes none in time does
        PROGRESS repeat the last position."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        lead = min(_HEARTBEAT_LEAD_SECONDS, progress_seconds / 2)
        every = min(_HEARTBEAT_MIN_SECONDS, lead)
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
