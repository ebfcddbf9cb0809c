"""The process's one Firestore Listen stream, shared by every watcher.

ListenHub keeps one Listen stream on a channel of its own (a connection
carries at most 100 streams, and the store's calls must not queue behind it),
with one query target per distinct filter, shared by its watchers and kept a
while after the last leaves, so reconnecting watchers reuse it. At every consistent
snapshot Firestore announces (a global NO_CHANGE with a read time), each
target's new view of the matching tasks is compared with the previous one
(taskservice.domain.changes.diff); the changes, in task id order, are
published once as a Snapshot that links to the next, and each watcher
follows the chain. A task that left a view is told apart (deleted, or
changed so that it no longer matches) from what Listen said about it, or
else by one BatchGetDocuments at the snapshot's read time.

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
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias, cast

import grpc

from taskservice.domain.changes import Change, diff
from taskservice.domain.errors import DeadlineExceeded, Internal, ServiceError, Unavailable
from taskservice.domain.model import Task, TaskFilter
from taskservice.domain.retry import Backoff
from taskservice.store.firestore._codec import (
    REQUEST_TIME,
    Document,
    FieldTransform,
    ListenRequest,
    ListenResponse,
    StructuredQuery,
    Target,
    TargetChange,
    Write,
    decode_task,
)
from taskservice.store.firestore._errors import LISTEN_RECONNECTS, store_error
from taskservice.store.firestore._rpc import FirestoreRpc

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.store.firestore_watch")

_HEARTBEAT_TARGET = 1
_HEARTBEATS = 16  # heartbeat documents; each process listens to one of them
HEARTBEAT_MIN_SECONDS = 5.0  # at most one heartbeat write per process this often
TARGET_LINGER_SECONDS = 30.0  # a target with no watcher left is kept this long
_RECONNECT = Backoff(first=0.1, maximum=5.0)  # no bound: as long as the hub runs
DELETED = object()  # a removal hint: Listen said the document was deleted
_Hint: TypeAlias = Task | object  # a Task, or DELETED


class _Corrupt(Exception):
    """A Listen response that did not parse."""


@dataclass(eq=False)
class Snapshot:
    """The matching tasks of one target at read time `at_ns`, and the changes
    from the previous snapshot (at base_ns)."""

    base_ns: int
    at_ns: int
    view: Mapping[str, Task] | None  # kept on a target's latest snapshot only
    changes: list[Change]
    next: asyncio.Future[Snapshot] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(eq=False)
class _Queued:
    """A consistent snapshot of one target, waiting to be published."""

    read_ns: int
    reset: bool
    pending: dict[str, Task | None]
    hints: dict[str, _Hint]


@dataclass(eq=False)
class _Target:
    target_id: int
    filter: TaskFilter
    query: StructuredQuery
    watchers: int = 0
    current: bool = False
    reset: bool = True  # pending holds the whole matching set (a new target, a RESET)
    resume_token: bytes = b""
    pending: dict[str, Task | None] = field(default_factory=dict)
    hints: dict[str, _Hint] = field(default_factory=dict)  # task id -> Task or DELETED
    latest: Snapshot | None = None
    first: asyncio.Future[Snapshot] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    failed: BaseException | None = None
    linger: asyncio.TimerHandle | None = None
    queued: _Queued | None = None  # a snapshot waiting for the publisher

    async def snapshot(self) -> Snapshot:
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

    def __init__(self, rpc: FirestoreRpc, verify_listen: bool = False) -> None:
        self.rpc = rpc
        self.names = rpc.collection
        # On the emulator only: check each snapshot against a read at its read time.
        self.verify_listen = verify_listen
        self._targets: dict[int, _Target] = {}
        self._by_filter: dict[TaskFilter, _Target] = {}
        self._next_id = _HEARTBEAT_TARGET + 1
        self._outbox: asyncio.Queue[ListenRequest] | None = None
        self._snapshots: asyncio.Queue[_Target] = asyncio.Queue()
        self._heartbeat_name = (
            f"{self.names.documents}/{self.names.collection}-watch/"
            f"heartbeat-{random.randrange(_HEARTBEATS)}"
        )
        self._heartbeat_at = 0.0
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._reported = 0.0
        self.corrections = 0  # emulator snapshots whose data lagged their read time
        self._stream = asyncio.create_task(self._run())
        self._publisher = asyncio.create_task(self._publish_all())

    @property
    def ended(self) -> bool:
        """Whether the stream's task has ended (it runs until close)."""
        return self._stream.done()

    # -- watchers ----------------------------------------------------------

    def subscribe(self, task_filter: TaskFilter) -> _Target:
        target = self._by_filter.get(task_filter)
        if target is None or target.failed is not None:
            query = self.names.view_query(task_filter)
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
                ListenRequest(database=self.names.database, remove_target=target.target_id)
            )

    def heartbeat(self, every: float = HEARTBEAT_MIN_SECONDS) -> None:
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

    def _add_request(self, target: _Target) -> ListenRequest:
        spec = Target(target_id=target.target_id)
        spec.query.parent = self.names.documents
        spec.query.structured_query.CopyFrom(target.query)
        if target.resume_token:
            spec.resume_token = target.resume_token
        return ListenRequest(database=self.names.database, add_target=spec)

    def _heartbeat_request(self) -> ListenRequest:
        spec = Target(target_id=_HEARTBEAT_TARGET)
        spec.documents.documents.append(self._heartbeat_name)
        return ListenRequest(database=self.names.database, add_target=spec)

    async def _write_heartbeat(self) -> None:
        write = Write(
            update=Document(name=self._heartbeat_name, fields={}),
            update_transforms=[
                FieldTransform(field_path="beat_time", set_to_server_value=REQUEST_TIME)
            ],
        )
        try:
            await self.rpc.commit_writes([write], 10.0)
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
            outbox: asyncio.Queue[ListenRequest] = asyncio.Queue()
            outbox.put_nowait(self._heartbeat_request())
            for target in self._targets.values():
                target.current = False
                outbox.put_nowait(self._add_request(target))
            self._outbox = outbox

            async def requests(
                box: asyncio.Queue[ListenRequest] = outbox,
            ) -> AsyncIterator[ListenRequest]:
                while True:
                    yield await box.get()

            call = self.rpc.listen(requests(), metadata=self.rpc.metadata)
            try:
                async for response in call:
                    if response is None:  # gRPC could not parse it: start over
                        raise _Corrupt
                    pauses = _RECONNECT.pauses()  # the stream answered: start over
                    self._on_response(response)
                code = grpc.StatusCode.UNAVAILABLE  # Firestore ended the stream
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in LISTEN_RECONNECTS:
                    error = store_error(exc)
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

    def _on_response(self, response: ListenResponse) -> None:
        kind = response.WhichOneof("response_type")
        if kind == "target_change":
            self._on_target_change(response.target_change)
        elif kind == "document_change":
            change = response.document_change
            if not change.document.name.startswith(self.names.task_prefix):
                return  # the heartbeat
            task = decode_task(change.document)
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
                        target.hints[task_id] = DELETED
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
                ListenRequest(database=self.names.database, remove_target=target.target_id)
            )
        target.target_id = self._take_id()
        target.resume_token = b""
        target.current = False
        target.reset = True
        target.pending.clear()
        self._targets[target.target_id] = target
        self._send_add(target)

    def _on_target_change(self, change: TargetChange) -> None:
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
        hints: dict[str, _Hint],
    ) -> Snapshot:
        old: Mapping[str, Task] = (target.latest.view or {}) if target.latest is not None else {}
        base_ns = target.latest.at_ns if target.latest is not None else 0
        if not reset and not pending and not self.verify_listen:
            return Snapshot(base_ns, read_ns, old, [])
        if self.verify_listen:
            # The emulator stamps a snapshot with a read time later than the
            # data it holds (by ~0.1 ms, in 11 of 160 snapshots under 16
            # writers); Firestore promises the data is consistent at it.
            # There, read the view at that time instead, so that what
            # positions mean is what a resume reads anywhere.
            new = await self.rpc.view_at(target.filter, read_ns)
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
            return Snapshot(0, read_ns, new, [])
        removed = [t for t in old if t not in new]
        if self.verify_listen:
            hints = {}  # Listen's word on them may lag too: read them at read_ns
        removed_as = await self.rpc.tasks_at([t for t in removed if t not in hints], read_ns)
        for task_id in removed:
            hint = hints.get(task_id)
            if hint is DELETED:
                removed_as[task_id] = None
            elif hint is not None:
                removed_as[task_id] = cast(Task, hint)
        changes = diff(old, new, removed_as=removed_as, snapshot_ns=read_ns)
        return Snapshot(base_ns, read_ns, new, changes)

    def _publish(self, target: _Target, snapshot: Snapshot) -> None:
        """Links the snapshot after the latest one. Only the latest keeps its
        view: a watcher far behind holds changes, not copies of the view."""
        previous, target.latest = target.latest, snapshot
        if previous is None:
            target.first.set_result(snapshot)
        else:
            previous.next.set_result(snapshot)
            previous.view = None
