"""The production store: Cloud Firestore over one grpc.aio channel per process
(the channel is built from configuration by taskservice.store.channels).

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

Firestore's errors reach the caller by what they mean: UNAVAILABLE (and
Firestore's transient INTERNAL/UNKNOWN) as UNAVAILABLE, safe to retry;
DEADLINE_EXCEEDED and ABORTED as themselves; RESOURCE_EXHAUSTED (quota) as
RESOURCE_EXHAUSTED; FAILED_PRECONDITION (e.g. an index still building) as
FAILED_PRECONDITION. Anything else (INVALID_ARGUMENT, OUT_OF_RANGE,
PERMISSION_DENIED, ...) means the service sent what it should not have or is
misconfigured: INTERNAL, logged with Firestore's own message. None of those is
ever reported as UNAVAILABLE, so no client retries it forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import grpc
from google.cloud.firestore_v1.types import common as _common
from google.cloud.firestore_v1.types import document as _document
from google.cloud.firestore_v1.types import firestore as _firestore
from google.cloud.firestore_v1.types import query as _query
from google.cloud.firestore_v1.types import write as _write
from google.protobuf import timestamp_pb2, wrappers_pb2

from taskservice.domain.changes import WatchEvent, WatchQuery
from taskservice.domain.errors import (
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from taskservice.domain.limits import REQUEST_ID_TTL_NS, check_batch_response_size
from taskservice.domain.model import (
    PRIORITIES,
    STATES,
    ListQuery,
    ListResult,
    NewTask,
    Task,
    TaskContent,
    TaskFilter,
    TaskPatch,
)
from taskservice.domain.retry import Backoff, retrying
from taskservice.store._common import (
    not_found,
    patched,
    request_id_of_deleted_task,
    stale_etag,
    taken,
)

if TYPE_CHECKING:
    from taskservice.observe.telemetry import Telemetry

# Raw protobuf classes (no proto-plus wrapping on the hot path).
Document: Any = _document.Document.pb()
Value: Any = _document.Value.pb()
ArrayValue: Any = _document.ArrayValue.pb()
Write: Any = _write.Write.pb()
FieldTransform: Any = _write.DocumentTransform.FieldTransform.pb()
Precondition: Any = _common.Precondition.pb()
CommitRequest: Any = _firestore.CommitRequest.pb()
CommitResponse: Any = _firestore.CommitResponse.pb()
GetDocumentRequest: Any = _firestore.GetDocumentRequest.pb()
BatchGetDocumentsRequest: Any = _firestore.BatchGetDocumentsRequest.pb()
BatchGetDocumentsResponse: Any = _firestore.BatchGetDocumentsResponse.pb()
RunQueryRequest: Any = _firestore.RunQueryRequest.pb()
RunQueryResponse: Any = _firestore.RunQueryResponse.pb()
StructuredQuery: Any = _query.StructuredQuery.pb()
QueryCursor: Any = _query.Cursor.pb()

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.store.firestore")

# The largest Commit request Firestore accepts (10 MiB; the emulator keeps
# gRPC's default 4 MiB receive limit). TaskService's own limits keep every
# commit well under both; this is the last check before the wire.
MAX_COMMIT_BYTES = 10 * 1024 * 1024 - 64 * 1024
_SERVICE = "/google.firestore.v1.Firestore/"
_RETRYABLE_READ = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# An idempotent read that fails transiently is tried three times in all.
_READ_BACKOFF = Backoff(attempts=3, first=0.05, maximum=1.0)
# A watcher's catch-up reads (a resume reading the past) have no caller
# waiting on a deadline: they wait for the channel to reconnect
# (wait_for_ready) and retry a call the network cut, for up to 30 s, so that
# a short outage delays a resume instead of ending it; after that the stream
# ends UNAVAILABLE with its resume token. (Three quick attempts ended resumes
# with UNAVAILABLE when the emulator reset the connection under 64 writers.)
_CATCH_UP_BACKOFF = Backoff(attempts=8, first=0.1, maximum=2.0)
_CATCH_UP_SECONDS = 30.0
# A guarded read-modify-write that loses a race retries after a random pause
# of up to 5, 10, 20, ... 200 ms: 32 writers at once on one document all
# succeed on the emulator (8 immediate retries left about a third ABORTED).
_UPDATE_BACKOFF = Backoff(attempts=24, first=0.005, maximum=0.2)
# A create commit refused for a reason the follow-up read does not explain
# (a racing delete, say) is sent again, at most this many times.
_CREATE_ATTEMPTS = 24
_REQUEST_TIME = FieldTransform.REQUEST_TIME


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(ns)
    return timestamp


def _fields(content: TaskContent) -> dict[str, Any]:
    return {
        "title": Value(string_value=content.title),
        "description": Value(string_value=content.description),
        "priority": Value(integer_value=int(content.priority)),
        "state": Value(integer_value=int(content.state)),
        "assignee": Value(string_value=content.assignee),
        "tags": Value(array_value=ArrayValue(values=[Value(string_value=t) for t in content.tags])),
    }


def _content(fields: Any) -> TaskContent:
    return TaskContent(
        title=fields["title"].string_value,
        description=fields["description"].string_value,
        priority=PRIORITIES[fields["priority"].integer_value],
        state=STATES[fields["state"].integer_value],
        assignee=fields["assignee"].string_value,
        tags=tuple(v.string_value for v in fields["tags"].array_value.values),
    )


def _task(doc: Any) -> Task:
    fields = doc.fields
    return Task(
        task_id=doc.name.rpartition("/")[2],
        content=_content(fields),
        create_time_ns=fields["create_time"].timestamp_value.ToNanoseconds(),
        update_time_ns=fields["update_time"].timestamp_value.ToNanoseconds(),
        version=doc.update_time.ToNanoseconds(),
    )


_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


class _LostRace(Exception):
    """A guarded commit found the document changed since it was read."""


def _store_error(exc: grpc.aio.AioRpcError) -> ServiceError:
    """What a Firestore error means for the caller (see the module docstring)."""
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the store did not answer in time")
    if code == grpc.StatusCode.ABORTED:
        return Conflict("the task was changed concurrently; retry")
    if code in _TRANSIENT:
        return Unavailable("the task store is unavailable; retry later")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        log.warning("Firestore: RESOURCE_EXHAUSTED: %s", (exc.details() or "")[:500])
        return ResourceExhausted(
            "the task store's quota is exhausted; retry later, with backoff",
            reason="STORE_RESOURCE_EXHAUSTED",
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        log.warning("Firestore: FAILED_PRECONDITION: %s", (exc.details() or "")[:500])
        return FailedPrecondition(
            "the task store cannot serve this request yet (for example, an index is still"
            " being built)",
            reason="STORE_NOT_READY",
        )
    error_id = uuid.uuid4().hex[:16]
    log.error(
        "Firestore refused a request: %s: %s (error_id=%s)",
        code.name,
        (exc.details() or "")[:500],
        error_id,
        extra={"fields": {"error_id": error_id}},
    )
    return Internal(f"internal error (error_id={error_id})", reason="STORE_REJECTED")


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
        self._channel = channel
        # The channels' target as gRFC A66 names it (grpc.target in metrics).
        self.target = target
        # On the emulator only: check each Listen snapshot against a read at
        # its read time (taskservice.store.firestore._watch).
        self.verify_listen = verify_listen
        self._listen_channel = listen_channel or channel
        self.max_commit_bytes = max_commit_bytes
        self.project = project
        self.database = f"projects/{project}/databases/{database}"
        self.documents = f"{self.database}/documents"
        self.collection = collection
        self._task_prefix = f"{self.documents}/{collection}/"
        self._request_prefix = f"{self.documents}/{collection}-requests/"
        routing = f"project_id={quote(project, safe='')}&database_id={quote(database, safe='')}"
        self._metadata = (
            ("google-cloud-resource-prefix", self.database),
            ("x-goog-request-params", routing),
            *extra_metadata,
        )

        self._telemetry: Telemetry | None = None

        def method(kind: str, name: str, request: Any, response: Any) -> Any:
            rpc = getattr(channel, kind)(
                _SERVICE + name,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )

            def call(*args: Any, **kwargs: Any) -> Any:
                telemetry = self._telemetry
                if telemetry is None:
                    return rpc(*args, **kwargs)
                if kind == "unary_unary":
                    return telemetry.firestore_unary(name, rpc(*args, **kwargs))
                return telemetry.firestore_stream(name, rpc(*args, **kwargs))

            return call

        self._commit = method("unary_unary", "Commit", CommitRequest, CommitResponse)
        self._get_document = method("unary_unary", "GetDocument", GetDocumentRequest, Document)
        self._batch_get = method(
            "unary_stream", "BatchGetDocuments", BatchGetDocumentsRequest, BatchGetDocumentsResponse
        )
        self._run_query = method("unary_stream", "RunQuery", RunQueryRequest, RunQueryResponse)
        from taskservice.store.firestore._watch import FirestoreWatcher

        self._watcher = FirestoreWatcher(self, watch_retention_seconds)

    # -- helpers ----------------------------------------------------------

    def _name(self, task_id: str) -> str:
        return self._task_prefix + task_id

    def _request_name(self, request_id: str) -> str:
        return self._request_prefix + request_id

    async def _read_retrying(
        self, call: Any, timeout: float, backoff: Backoff = _READ_BACKOFF
    ) -> Any:
        """Runs an idempotent read, retrying a transient failure a few times
        (within timeout) before the caller is told UNAVAILABLE."""

        async def attempt(remaining: float) -> Any:
            if remaining <= 0:
                raise DeadlineExceeded("the store did not answer in time")
            return await call(remaining)

        return await retrying(
            attempt,
            retryable=lambda e: isinstance(e, grpc.aio.AioRpcError) and e.code() in _RETRYABLE_READ,
            backoff=backoff,
            timeout=timeout,
        )

    async def _get_doc(self, name: str, timeout: float) -> Any | None:
        async def call(t: float) -> Any:
            return await self._get_document(
                GetDocumentRequest(name=name), timeout=t, metadata=self._metadata
            )

        try:
            return await self._read_retrying(call, timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _store_error(exc) from None

    async def _get_docs(self, names: Sequence[str], timeout: float) -> dict[str, Any]:
        """The documents that exist among names, by name (one BatchGetDocuments)."""

        async def call(t: float) -> dict[str, Any]:
            found: dict[str, Any] = {}
            request = BatchGetDocumentsRequest(database=self.database, documents=list(names))
            async for response in self._batch_get(request, timeout=t, metadata=self._metadata):
                if response.HasField("found"):
                    found[response.found.name] = response.found
            return found

        try:
            result: dict[str, Any] = await self._read_retrying(call, timeout)
            return result
        except grpc.aio.AioRpcError as exc:
            raise _store_error(exc) from None

    async def _commit_writes(self, writes: list[Any], timeout: float) -> Any:
        request = CommitRequest(database=self.database, writes=writes)
        if len(writes) > 2 and request.ByteSize() > self.max_commit_bytes:
            size = request.ByteSize()
            raise InvalidArgument(
                [
                    (
                        "requests",
                        f"the commit would be {size} bytes, over the store's limit of"
                        f" {self.max_commit_bytes}; send fewer or smaller tasks per call;"
                        " nothing was written",
                    )
                ],
                reason="BATCH_COMMIT_TOO_LARGE",
                metadata={"limit_bytes": str(self.max_commit_bytes), "size_bytes": str(size)},
            )
        return await self._commit(request, timeout=timeout, metadata=self._metadata)

    # -- TaskStore --------------------------------------------------------

    async def check(self, timeout: float) -> None:
        await self._get_doc(self._request_name("readiness-probe"), timeout)

    async def create_many(self, items: Sequence[NewTask], timeout: float) -> list[Task]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        resolved: dict[int, Task] = {}  # items answered by an earlier request_id
        for _ in range(_CREATE_ATTEMPTS):
            pending = [(i, item) for i, item in enumerate(items) if i not in resolved]
            if not pending:
                return [resolved[i] for i in range(len(items))]
            writes: list[Any] = []
            for _i, item in pending:
                writes.append(self._create_write(item))
                if item.request_id is not None:
                    writes.append(self._request_write(item.request_id, item.task_id))
            try:
                response = await self._commit_writes(writes, deadline - loop.time())
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    raise _store_error(exc) from None
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

    def _create_write(self, item: NewTask) -> Any:
        return Write(
            update=Document(name=self._name(item.task_id), fields=_fields(item.content)),
            current_document=Precondition(exists=False),
            update_transforms=[
                FieldTransform(field_path="create_time", set_to_server_value=_REQUEST_TIME),
                FieldTransform(field_path="update_time", set_to_server_value=_REQUEST_TIME),
            ],
        )

    def _request_write(self, request_id: str, task_id: str) -> Any:
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
        found = await self._get_docs(names, timeout)
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
                await self._get_docs([self._name(t) for t in missing], deadline - loop.time())
            )
        for index, item in enumerate(items):
            if index in resolved:
                continue
            if index in claimed:
                task_id = claimed[index]
                doc = found.get(self._name(task_id))
                if doc is None:
                    raise request_id_of_deleted_task(task_id)
                resolved[index] = _task(doc)
                continue
            if self._name(item.task_id) in found:
                raise taken(item.task_id, index)
        # Nothing explained the failure (e.g. a racing delete): the caller's loop retries.

    async def get(self, task_id: str, timeout: float) -> Task:
        doc = await self._get_doc(self._name(task_id), timeout)
        if doc is None:
            raise not_found(task_id)
        return _task(doc)

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
            doc = await self._get_doc(name, remaining)
            if doc is None:
                raise not_found(task_id)
            current = _task(doc)
            content = patched(current, patch, expected_version)
            fields = _fields(content)
            fields["create_time"] = doc.fields["create_time"]
            write = Write(
                update=Document(name=name, fields=fields),
                current_document=Precondition(update_time=doc.update_time),
                update_transforms=[
                    FieldTransform(field_path="update_time", set_to_server_value=_REQUEST_TIME)
                ],
            )
            try:
                response = await self._commit_writes([write], deadline - loop.time())
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    raise _LostRace from None  # changed or deleted since the read
                raise _store_error(exc) from None
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
            await self._commit_writes([Write(delete=name, current_document=precondition)], timeout)
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
                if await self._get_doc(name, deadline - loop.time()) is None:
                    raise not_found(task_id) from None
                raise stale_etag(task_id) from None
            raise _store_error(exc) from None

    def build_query(self, query: ListQuery) -> Any:
        """The StructuredQuery for one list page (public so tests can derive
        the query shapes that firestore.indexes.json must cover)."""
        sq = StructuredQuery()
        sq.from_.add(collection_id=self.collection)
        filters = _filters(query.filter)
        if len(filters) == 1:
            sq.where.CopyFrom(filters[0])
        elif filters:
            sq.where.composite_filter.op = StructuredQuery.CompositeFilter.AND
            sq.where.composite_filter.filters.extend(filters)
        direction = (
            StructuredQuery.DESCENDING if query.ordering.descending else StructuredQuery.ASCENDING
        )
        sq.order_by.add(
            field=StructuredQuery.FieldReference(field_path=query.ordering.field.value),
            direction=direction,
        )
        sq.order_by.add(
            field=StructuredQuery.FieldReference(field_path="__name__"), direction=direction
        )
        if query.after is not None:
            sq.start_at.CopyFrom(
                QueryCursor(
                    values=[
                        Value(timestamp_value=timestamp_from_ns(query.after.time_ns)),
                        Value(reference_value=self._name(query.after.task_id)),
                    ],
                    before=False,
                )
            )
        sq.limit.CopyFrom(wrappers_pb2.Int32Value(value=query.limit + 1))
        return sq

    async def list(self, query: ListQuery, timeout: float) -> ListResult:
        request = RunQueryRequest(parent=self.documents, structured_query=self.build_query(query))

        async def call(t: float) -> list[Any]:
            docs: list[Any] = []
            async for response in self._run_query(request, timeout=t, metadata=self._metadata):
                if response.HasField("document"):
                    docs.append(response.document)
            return docs

        try:
            docs = await self._read_retrying(call, timeout)
        except grpc.aio.AioRpcError as exc:
            raise _store_error(exc) from None
        return ListResult([_task(d) for d in docs[: query.limit]], has_more=len(docs) > query.limit)

    # -- WatchTasks (taskservice.store.firestore._watch) ----------------------

    def watch(self, query: WatchQuery) -> AsyncIterator[WatchEvent]:
        return self._watcher.watch(query)

    def document(self, name: str, fields: dict[str, Any]) -> Any:
        return Document(name=name, fields=fields)

    async def view_at(self, task_filter: TaskFilter, read_ns: int) -> dict[str, Task]:
        """The tasks matching task_filter as they were at read time read_ns
        (one RunQuery in the past), by task id."""
        query = self.build_query(ListQuery(filter=task_filter))
        query.ClearField("limit")
        request = RunQueryRequest(
            parent=self.documents, structured_query=query, read_time=timestamp_from_ns(read_ns)
        )

        async def call(t: float) -> dict[str, Task]:
            found: dict[str, Task] = {}
            async for response in self._run_query(
                request, timeout=t, metadata=self._metadata, wait_for_ready=True
            ):
                if response.HasField("document"):
                    task = _task(response.document)
                    found[task.task_id] = task
            return found

        result: dict[str, Task] = await self._catch_up(call)
        return result

    async def tasks_at(self, task_ids: Sequence[str], read_ns: int) -> dict[str, Task | None]:
        """The tasks with these ids as they were at read time read_ns (None:
        absent then), in one BatchGetDocuments."""
        if not task_ids:
            return {}
        request = BatchGetDocumentsRequest(
            database=self.database,
            documents=[self._name(t) for t in task_ids],
            read_time=timestamp_from_ns(read_ns),
        )

        async def call(t: float) -> dict[str, Task | None]:
            found: dict[str, Task | None] = dict.fromkeys(task_ids)
            async for response in self._batch_get(
                request, timeout=t, metadata=self._metadata, wait_for_ready=True
            ):
                if response.HasField("found"):
                    task = _task(response.found)
                    found[task.task_id] = task
            return found

        result: dict[str, Task | None] = await self._catch_up(call)
        return result

    async def _catch_up(self, call: Any) -> Any:
        """Runs a read in the past for a watcher (see _CATCH_UP_BACKOFF)."""
        try:
            return await self._read_retrying(call, _CATCH_UP_SECONDS, _CATCH_UP_BACKOFF)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _past_read_error(exc) from None
        except DeadlineExceeded:
            pass
        raise Unavailable(
            f"the task store did not answer for {_CATCH_UP_SECONDS:g} s; resume with the"
            " resume_token of the last event received"
        )

    def use_telemetry(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        telemetry.firestore_target = self.target

    async def close(self) -> None:
        await self._watcher.close()
        await self._channel.close()
        if self._listen_channel is not self._channel:
            await self._listen_channel.close()


def _past_read_error(exc: grpc.aio.AioRpcError) -> ServiceError:
    """A read at a past time that Firestore refuses is one too old to honour."""
    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        details = (exc.details() or "").lower()
        if "read_time" in details or "read time" in details or "too old" in details:
            return OutOfRange(
                "the resume token can no longer be honoured (Firestore no longer has the"
                " versions it points to); list the tasks again, then watch from now",
                reason="RESUME_TOKEN_EXPIRED",
            )
    return _store_error(exc)


def _filters(f: TaskFilter) -> list[Any]:
    FieldFilter = StructuredQuery.FieldFilter
    out: list[Any] = []

    def add(field: str, op: int, value: Any) -> None:
        filt = StructuredQuery.Filter()
        filt.field_filter.CopyFrom(
            FieldFilter(field=StructuredQuery.FieldReference(field_path=field), op=op, value=value)
        )
        out.append(filt)

    if f.state is not None:
        add("state", FieldFilter.EQUAL, Value(integer_value=int(f.state)))
    if f.priority is not None:
        add("priority", FieldFilter.EQUAL, Value(integer_value=int(f.priority)))
    if f.assignee is not None:
        add("assignee", FieldFilter.EQUAL, Value(string_value=f.assignee))
    if f.tag is not None:
        add("tags", FieldFilter.ARRAY_CONTAINS, Value(string_value=f.tag))
    return out
