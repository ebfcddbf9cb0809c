"""FirestoreStore: the TaskStore calls on Cloud Firestore, over the RPC layer
(taskservice.store.firestore._rpc; its channel is built from configuration by
taskservice.store.channels).

It speaks the Firestore v1 protocol with google-cloud-firestore's own protobuf
messages (the raw classes under its proto-plus types), skipping the
high-level client's per-call conversions: every TaskService call costs the
fewest Firestore round trips, each counted in tests:

- create / batch create: one Commit with `exists = false` preconditions; the
  create and update times come back as transform results, so nothing is read
  back. A request_id is a marker document written in the same commit.
- get: one GetDocument.
- delete: one Commit whose precondition is existence, or the etag (the
  document's update_time) when one is given.
- update: one GetDocument plus one Commit guarded by the update_time read;
  retried on a concurrent change, so no write is lost.
- list page: one RunQuery with a cursor (start after the last task seen).

Slow paths (a precondition failed and the reason must be told) spend extra
reads only on failure.

What Firestore's errors mean to the caller: taskservice.store.firestore._errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc

from taskservice.domain.changes import WatchEvent, WatchQuery
from taskservice.domain.errors import Conflict
from taskservice.domain.limits import MAX_COMMIT_BYTES, REQUEST_ID_TTL_NS
from taskservice.domain.model import ListQuery, ListResult, NewTask, Task, TaskPatch
from taskservice.domain.retry import Backoff, retrying
from taskservice.domain.sizes import check_batch_response_size
from taskservice.store._common import (
    not_found,
    patched,
    request_id_of_deleted_task,
    stale_etag,
    taken,
)
from taskservice.store.firestore._codec import (
    REQUEST_TIME,
    Collection,
    Document,
    FieldTransform,
    Precondition,
    RunQueryRequest,
    StructuredQuery,
    Value,
    Write,
    decode_task,
    encode_content,
    timestamp_from_ns,
)
from taskservice.store.firestore._errors import store_error
from taskservice.store.firestore._rpc import FirestoreRpc
from taskservice.store.firestore._watch import FirestoreWatcher

if TYPE_CHECKING:
    from taskservice.observe.telemetry import Telemetry

# A guarded read-modify-write that loses a race retries after a random pause
# of up to 5, 10, 20, ... 200 ms: 32 writers at once on one document all
# succeed on the emulator, where 8 immediate retries leave about a third ABORTED.
_UPDATE_BACKOFF = Backoff(attempts=24, first=0.005, maximum=0.2)
# A create commit refused for a reason the follow-up read does not explain
# (a racing delete, say) is sent again, at most this many times.
_CREATE_ATTEMPTS = 24


class _LostRace(Exception):
    """A guarded commit found the document changed since it was read."""


class FirestoreStore:
    """TaskStore over Cloud Firestore (or its emulator)."""

    kind = "firestore"

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        project: str,
        database: str = "(default)",
        collection: str = "tasks",
        extra_metadata: Sequence[tuple[str, str]] = (),
        max_commit_bytes: int = MAX_COMMIT_BYTES,
        watch_retention_seconds: float = 3540.0,
        listen_channel: grpc.aio.Channel | None = None,
        verify_listen: bool = False,
        target: str = "",
    ) -> None:
        self.names = Collection(project, database, collection)
        self.rpc = FirestoreRpc(
            channel,
            self.names,
            extra_metadata=extra_metadata,
            max_commit_bytes=max_commit_bytes,
            listen_channel=listen_channel,
        )
        # The channels' target as gRFC A66 names it (grpc.target in metrics).
        self.target = target
        self.max_commit_bytes = max_commit_bytes
        self.project = project
        self.database = self.names.database
        self.documents = self.names.documents
        self.collection = collection
        # On the emulator only: check each Listen snapshot against a read at
        # its read time (taskservice.store.firestore._watch).
        self.verify_listen = verify_listen
        self._watcher = FirestoreWatcher(
            self.rpc, watch_retention_seconds, verify_listen=verify_listen
        )

    # -- helpers ----------------------------------------------------------

    def _name(self, task_id: str) -> str:
        return self.names.task(task_id)

    def _request_name(self, request_id: str) -> str:
        return self.names.request(request_id)

    # -- TaskStore --------------------------------------------------------

    async def check(self, timeout: float) -> None:
        await self.rpc.get_doc(self._request_name("readiness-probe"), timeout)

    async def create_many(self, items: Sequence[NewTask], timeout: float) -> list[Task]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        resolved: dict[int, Task] = {}  # items answered by an earlier request_id
        for _ in range(_CREATE_ATTEMPTS):
            pending = [(i, item) for i, item in enumerate(items) if i not in resolved]
            if not pending:
                return [resolved[i] for i in range(len(items))]
            writes: list[Write] = []
            for _i, item in pending:
                writes.append(self._create_write(item))
                if item.request_id is not None:
                    writes.append(self._request_write(item.request_id, item.task_id))
            try:
                response = await self.rpc.commit_writes(writes, deadline - loop.time())
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    raise store_error(exc) from None
                await self._explain_conflict(items, resolved, deadline - loop.time())
                if resolved:  # earlier tasks may be larger than these items
                    check_batch_response_size(
                        (resolved[i].task_id, resolved[i].content)
                        if i in resolved
                        else (item.task_id, item.content)
                        for i, item in enumerate(items)
                    )
                continue
            results = iter(response.write_results)
            for i, item in pending:
                result = next(results)
                if item.request_id is not None:
                    next(results)
                created = result.transform_results[0].timestamp_value.ToNanoseconds()
                resolved[i] = Task(
                    item.task_id,
                    item.content,
                    created,
                    result.transform_results[1].timestamp_value.ToNanoseconds(),
                    result.update_time.ToNanoseconds(),
                )
            return [resolved[i] for i in range(len(items))]
        raise Conflict("the tasks are being created by many callers at once; retry")

    def _create_write(self, item: NewTask) -> Write:
        return Write(
            update=Document(name=self._name(item.task_id), fields=encode_content(item.content)),
            current_document=Precondition(exists=False),
            update_transforms=[
                FieldTransform(field_path="create_time", set_to_server_value=REQUEST_TIME),
                FieldTransform(field_path="update_time", set_to_server_value=REQUEST_TIME),
            ],
        )

    def _request_write(self, request_id: str, task_id: str) -> Write:
        """The marker that remembers which task request_id created."""
        expire = timestamp_from_ns(time.time_ns() + REQUEST_ID_TTL_NS)
        return Write(
            update=Document(
                name=self._request_name(request_id),
                fields={
                    "task_id": Value(string_value=task_id),
                    "expire_time": Value(timestamp_value=expire),
                },
            ),
            current_document=Precondition(exists=False),
        )

    async def _explain_conflict(
        self, items: Sequence[NewTask], resolved: dict[int, Task], timeout: float
    ) -> None:
        """After a failed create commit: resolves items whose request_id was
        used before (into `resolved`), or raises AlreadyExists for a taken id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        names = [self._name(item.task_id) for item in items]
        names += [self._request_name(i.request_id) for i in items if i.request_id is not None]
        found = await self.rpc.get_docs(names, timeout)
        claimed: dict[int, str] = {}  # item index -> task_id its request_id created
        for index, item in enumerate(items):
            if index in resolved or item.request_id is None:
                continue
            marker = found.get(self._request_name(item.request_id))
            if marker is not None:
                claimed[index] = marker.fields["task_id"].string_value
        missing = [t for t in claimed.values() if self._name(t) not in found]
        if missing:
            found.update(
                await self.rpc.get_docs([self._name(t) for t in missing], deadline - loop.time())
            )
        for index, item in enumerate(items):
            if index in resolved:
                continue
            if index in claimed:
                task_id = claimed[index]
                doc = found.get(self._name(task_id))
                if doc is None:
                    raise request_id_of_deleted_task(task_id)
                resolved[index] = decode_task(doc)
                continue
            if self._name(item.task_id) in found:
                raise taken(item.task_id, index)
        # Nothing explained the failure (e.g. a racing delete): the caller's loop retries.

    async def get(self, task_id: str, timeout: float) -> Task:
        doc = await self.rpc.get_doc(self._name(task_id), timeout)
        if doc is None:
            raise not_found(task_id)
        return decode_task(doc)

    async def update(
        self, task_id: str, patch: TaskPatch, expected_version: int | None, timeout: float
    ) -> Task:
        """Read, patch, commit guarded by the read's update_time. A commit that
        loses to another writer reads again, after a random pause, so that a
        crowd of writers to one document spreads out instead of colliding
        again in lockstep."""
        name = self._name(task_id)

        async def attempt(remaining: float) -> Task:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + remaining
            doc = await self.rpc.get_doc(name, remaining)
            if doc is None:
                raise not_found(task_id)
            current = decode_task(doc)
            content = patched(current, patch, expected_version)
            fields = encode_content(content)
            fields["create_time"] = doc.fields["create_time"]
            write = Write(
                update=Document(name=name, fields=fields),
                current_document=Precondition(update_time=doc.update_time),
                update_transforms=[
                    FieldTransform(field_path="update_time", set_to_server_value=REQUEST_TIME)
                ],
            )
            try:
                response = await self.rpc.commit_writes([write], deadline - loop.time())
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    raise _LostRace from None  # changed or deleted since the read
                raise store_error(exc) from None
            result = response.write_results[0]
            return Task(
                task_id,
                content,
                current.create_time_ns,
                result.transform_results[0].timestamp_value.ToNanoseconds(),
                result.update_time.ToNanoseconds(),
            )

        try:
            return await retrying(
                attempt,
                retryable=lambda e: isinstance(e, _LostRace),
                backoff=_UPDATE_BACKOFF,
                timeout=timeout,
            )
        except _LostRace:
            raise Conflict(
                f"tasks/{task_id} is being changed by many callers at once; retry"
            ) from None

    async def delete(self, task_id: str, expected_version: int | None, timeout: float) -> None:
        name = self._name(task_id)
        if expected_version is None:
            precondition = Precondition(exists=True)
        else:
            precondition = Precondition(update_time=timestamp_from_ns(expected_version))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.rpc.commit_writes(
                [Write(delete=name, current_document=precondition)], timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise not_found(task_id) from None
            stale = exc.code() == grpc.StatusCode.FAILED_PRECONDITION or (
                # Firestore refuses an update_time precondition newer than the
                # stored version as INVALID_ARGUMENT: to the caller, an etag
                # that is not the task's current one, like any other.
                exc.code() == grpc.StatusCode.INVALID_ARGUMENT and expected_version is not None
            )
            if stale:
                # Stale etag, or no such task: one read tells which.
                if await self.rpc.get_doc(name, deadline - loop.time()) is None:
                    raise not_found(task_id) from None
                raise stale_etag(task_id) from None
            raise store_error(exc) from None

    def build_query(self, query: ListQuery) -> StructuredQuery:
        """The StructuredQuery for one list page (public so tests can derive
        the query shapes that firestore.indexes.json must cover)."""
        return self.names.query(query)

    async def list(self, query: ListQuery, timeout: float) -> ListResult:
        request = RunQueryRequest(parent=self.documents, structured_query=self.build_query(query))

        async def call(t: float) -> list[Document]:
            docs: list[Document] = []
            async for response in self.rpc.run_query(
                request, timeout=t, metadata=self.rpc.metadata
            ):
                if response.HasField("document"):
                    docs.append(response.document)
            return docs

        try:
            docs = await self.rpc.read_retrying(call, timeout)
        except grpc.aio.AioRpcError as exc:
            raise store_error(exc) from None
        return ListResult(
            [decode_task(d) for d in docs[: query.limit]], has_more=len(docs) > query.limit
        )

    # -- WatchTasks (taskservice.store.firestore._watch) ----------------------

    def watch(self, query: WatchQuery) -> AsyncIterator[WatchEvent]:
        return self._watcher.watch(query)

    def use_telemetry(self, telemetry: Telemetry) -> None:
        self.rpc.telemetry = telemetry
        telemetry.firestore_target = self.target

    async def close(self) -> None:
        await self._watcher.close()
        await self.rpc.close()
