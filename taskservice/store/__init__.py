"""The async store interface that the servicer talks to (TaskStore), and the
factory that picks one (open_store): store.sqlite or store.firestore, each
imported only when chosen; store.channels builds Firestore's channels from
configuration. Shared helpers of both stores live in store._common.

Every method takes `timeout`, the seconds left of the caller's deadline; a
store must give up by then. Stores raise taskservice.domain.errors.ServiceError
subclasses (NotFound, AlreadyExists, EtagMismatch, Unavailable, ...) and
nothing else for expected failures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

from taskservice.domain.changes import WatchEvent, WatchQuery
from taskservice.domain.limits import MAX_COMMIT_BYTES
from taskservice.domain.model import ListQuery, ListResult, NewTask, Task, TaskPatch

if TYPE_CHECKING:
    from taskservice.config import Config
    from taskservice.observe.telemetry import Telemetry

__all__ = ["TaskStore", "open_store"]


class TaskStore(Protocol):
    """What the servicer needs from a store."""

    kind: str

    async def check(self, timeout: float) -> None:
        """Returns when the store answers; raises Unavailable otherwise."""

    async def create_many(self, items: Sequence[NewTask], timeout: float) -> list[Task]:
        """Creates all items in one atomic commit, or none.

        An item whose request_id was used before yields the task first created
        for it and creates nothing. A taken task_id raises AlreadyExists whose
        index names the item. When such earlier tasks would make the result
        exceed limits.MAX_BATCH_RESPONSE_BYTES, raises InvalidArgument before
        anything is written.
        """
        ...

    async def get(self, task_id: str, timeout: float) -> Task: ...

    async def update(
        self, task_id: str, patch: TaskPatch, expected_version: int | None, timeout: float
    ) -> Task:
        """Applies patch; EtagMismatch when expected_version (the version an
        etag names) is set and is not the task's current one."""
        ...

    async def delete(self, task_id: str, expected_version: int | None, timeout: float) -> None:
        """Deletes the task; EtagMismatch as for update."""
        ...

    async def list(self, query: ListQuery, timeout: float) -> ListResult: ...

    def watch(self, query: WatchQuery) -> AsyncIterator[WatchEvent]:
        """The changes to the tasks matching query.filter, as they commit
        (taskservice.domain.changes says what each means): with query.after, exactly
        after that position; else from now, first every matching task when
        query.include_initial, then CURRENT. PROGRESS after
        query.progress_seconds without an event. Runs until the caller stops
        iterating. A position the store can no longer honour raises OutOfRange
        (RESUME_TOKEN_EXPIRED); one it never issued, InvalidArgument."""
        ...

    def use_telemetry(self, telemetry: Telemetry) -> None:
        """From now on, record the store's own calls (Firestore RPCs, SQLite
        commits) as metrics and as child spans of the call being served."""

    async def close(self) -> None: ...


def open_store(config: Config) -> TaskStore:
    """Builds the configured store; imports only the backend it uses. The
    Firestore store needs config.project (the entry point discovers it from
    the credentials when it is not set)."""
    if config.store == "firestore":
        from taskservice.store.channels import (
            FIRESTORE_HOST,
            canonical_target,
            firestore_channel,
        )
        from taskservice.store.firestore import FirestoreStore

        if not config.project:
            raise ValueError("the Firestore store needs config.project")
        connection = firestore_channel(config)
        listen = firestore_channel(config, purpose="listen")
        return FirestoreStore(
            connection.channel,
            project=config.project,
            database=config.firestore_database,
            collection=config.collection,
            extra_metadata=connection.extra_metadata,
            max_commit_bytes=connection.max_commit_bytes or MAX_COMMIT_BYTES,
            watch_retention_seconds=config.watch_retention_seconds,
            listen_channel=listen.channel,
            verify_listen=bool(config.firestore_emulator_host),
            target=canonical_target(config.firestore_emulator_host or FIRESTORE_HOST),
        )
    from taskservice.store.sqlite import SqliteStore

    return SqliteStore(config.sqlite_path, watch_retention_seconds=config.watch_retention_seconds)
