"""The Firestore RPC layer: the channels, the metadata every call carries,
the RPCs (each counted by telemetry when it is on), retried idempotent reads,
the size check of a commit, and the reads at a past read time that watchers
make. The store and the Listen hub share one of these."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import quote

import grpc
from google.protobuf.message import Message

from taskservice.domain.errors import DeadlineExceeded, InvalidArgument, Unavailable
from taskservice.domain.limits import MAX_COMMIT_BYTES
from taskservice.domain.model import Task, TaskFilter
from taskservice.domain.retry import Backoff, retrying
from taskservice.store.firestore._codec import (
    BatchGetDocumentsRequest,
    BatchGetDocumentsResponse,
    Collection,
    CommitRequest,
    CommitResponse,
    Document,
    GetDocumentRequest,
    ListenRequest,
    ListenResponse,
    RunQueryRequest,
    RunQueryResponse,
    Write,
    decode_task,
    timestamp_from_ns,
)
from taskservice.store.firestore._errors import READ_RETRIED, past_read_error, store_error

if TYPE_CHECKING:
    from taskservice.observe.telemetry import Telemetry

T = TypeVar("T")

# A Firestore RPC: a message and call options in, a call object out (awaited
# for a unary RPC, iterated for a streaming one). Its messages are the raw
# classes _codec names, which mypy cannot type; so the calls are untyped too.
_Rpc: TypeAlias = Callable[..., Any]

_SERVICE = "/google.firestore.v1.Firestore/"
# An idempotent read that fails transiently is tried three times in all.
_READ_BACKOFF = Backoff(attempts=3, first=0.05, maximum=1.0)
# A watcher's catch-up reads (a resume reading the past) have no caller
# waiting on a deadline: they wait for the channel to reconnect
# (wait_for_ready) and retry a call the network cut, for up to 30 s, so that
# a short outage delays a resume instead of ending it; after that the stream
# ends UNAVAILABLE with its resume token. (Three quick attempts, as for other
# reads, end resumes with UNAVAILABLE when the emulator resets the connection
# under 64 writers.)
_CATCH_UP_BACKOFF = Backoff(attempts=8, first=0.1, maximum=2.0)
_CATCH_UP_SECONDS = 30.0


class FirestoreRpc:
    """Firestore v1 over grpc.aio for one collection."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        collection: Collection,
        *,
        extra_metadata: Sequence[tuple[str, str]] = (),
        max_commit_bytes: int = MAX_COMMIT_BYTES,
        listen_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._channel = channel
        self._listen_channel = listen_channel or channel
        self.collection = collection
        self.max_commit_bytes = max_commit_bytes
        routing = (
            f"project_id={quote(collection.project, safe='')}"
            f"&database_id={quote(collection.database_id, safe='')}"
        )
        self.metadata = (
            ("google-cloud-resource-prefix", collection.database),
            ("x-goog-request-params", routing),
            *extra_metadata,
        )
        self.telemetry: Telemetry | None = None

        def method(kind: str, name: str, request: type[Message], response: type[Message]) -> _Rpc:
            rpc = getattr(channel, kind)(
                _SERVICE + name,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )

            def call(*args: object, **kwargs: object) -> object:
                telemetry = self.telemetry
                if telemetry is None:
                    return rpc(*args, **kwargs)
                if kind == "unary_unary":
                    return telemetry.firestore_unary(name, rpc(*args, **kwargs))
                return telemetry.firestore_stream(name, rpc(*args, **kwargs))

            return call

        self.commit = method("unary_unary", "Commit", CommitRequest, CommitResponse)
        self.get_document = method("unary_unary", "GetDocument", GetDocumentRequest, Document)
        self.batch_get = method(
            "unary_stream", "BatchGetDocuments", BatchGetDocumentsRequest, BatchGetDocumentsResponse
        )
        self.run_query = method("unary_stream", "RunQuery", RunQueryRequest, RunQueryResponse)
        # The shared Listen stream, on its own channel where there is one.
        self.listen = self._listen_channel.stream_stream(
            _SERVICE + "Listen",
            request_serializer=ListenRequest.SerializeToString,
            response_deserializer=ListenResponse.FromString,
        )

    async def read_retrying(
        self,
        call: Callable[[float], Awaitable[T]],
        timeout: float,
        backoff: Backoff = _READ_BACKOFF,
    ) -> T:
        """Runs an idempotent read, retrying a transient failure a few times
        (within timeout) before the caller is told UNAVAILABLE."""

        async def attempt(remaining: float) -> T:
            if remaining <= 0:
                raise DeadlineExceeded("the store did not answer in time")
            return await call(remaining)

        return await retrying(
            attempt,
            retryable=lambda e: isinstance(e, grpc.aio.AioRpcError) and e.code() in READ_RETRIED,
            backoff=backoff,
            timeout=timeout,
        )

    async def get_doc(self, name: str, timeout: float) -> Document | None:
        """The document named name, or None where there is none (one GetDocument)."""

        async def call(t: float) -> Document:
            return await self.get_document(
                GetDocumentRequest(name=name), timeout=t, metadata=self.metadata
            )

        try:
            return await self.read_retrying(call, timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise store_error(exc) from None

    async def get_docs(self, names: Sequence[str], timeout: float) -> dict[str, Document]:
        """The documents that exist among names, by name (one BatchGetDocuments)."""

        async def call(t: float) -> dict[str, Document]:
            found: dict[str, Document] = {}
            request = BatchGetDocumentsRequest(
                database=self.collection.database, documents=list(names)
            )
            async for response in self.batch_get(request, timeout=t, metadata=self.metadata):
                if response.HasField("found"):
                    found[response.found.name] = response.found
            return found

        try:
            return await self.read_retrying(call, timeout)
        except grpc.aio.AioRpcError as exc:
            raise store_error(exc) from None

    async def commit_writes(self, writes: list[Write], timeout: float) -> CommitResponse:
        """One Commit; an over-large one of more than two writes is refused
        before it is sent. Raises Firestore's own error."""
        request = CommitRequest(database=self.collection.database, writes=writes)
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
        return await self.commit(request, timeout=timeout, metadata=self.metadata)

    # -- reads at a past read time, for watchers -----------------------------

    async def view_at(self, task_filter: TaskFilter, read_ns: int) -> dict[str, Task]:
        """The tasks matching task_filter as they were at read time read_ns
        (one RunQuery in the past), by task id."""
        request = RunQueryRequest(
            parent=self.collection.documents,
            structured_query=self.collection.view_query(task_filter),
            read_time=timestamp_from_ns(read_ns),
        )

        async def call(t: float) -> dict[str, Task]:
            found: dict[str, Task] = {}
            async for response in self.run_query(
                request, timeout=t, metadata=self.metadata, wait_for_ready=True
            ):
                if response.HasField("document"):
                    task = decode_task(response.document)
                    found[task.task_id] = task
            return found

        return await self._catch_up(call)

    async def tasks_at(self, task_ids: Sequence[str], read_ns: int) -> dict[str, Task | None]:
        """The tasks with these ids as they were at read time read_ns (None:
        absent then), in one BatchGetDocuments."""
        if not task_ids:
            return {}
        request = BatchGetDocumentsRequest(
            database=self.collection.database,
            documents=[self.collection.task(t) for t in task_ids],
            read_time=timestamp_from_ns(read_ns),
        )

        async def call(t: float) -> dict[str, Task | None]:
            found: dict[str, Task | None] = dict.fromkeys(task_ids)
            async for response in self.batch_get(
                request, timeout=t, metadata=self.metadata, wait_for_ready=True
            ):
                if response.HasField("found"):
                    task = decode_task(response.found)
                    found[task.task_id] = task
            return found

        return await self._catch_up(call)

    async def _catch_up(self, call: Callable[[float], Awaitable[T]]) -> T:
        """Runs a read in the past for a watcher (see _CATCH_UP_BACKOFF)."""
        try:
            return await self.read_retrying(call, _CATCH_UP_SECONDS, _CATCH_UP_BACKOFF)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise past_read_error(exc) from None
        except DeadlineExceeded:
            pass
        raise Unavailable(
            f"the task store did not answer for {_CATCH_UP_SECONDS:g} s; resume with the"
            " resume_token of the last event received"
        )

    async def close(self) -> None:
        await self._channel.close()
        if self._listen_channel is not self._channel:
            await self._listen_channel.close()
