"""What a change means to a watcher (WatchTasks), the same for both stores.

A watcher sees the tasks that match its filter. A commit turns one version of
a task (or none) into another (or none); `event_for` says what the watcher is
told: the task starts to match (ADDED), changes while matching (MODIFIED),
stops matching or is gone (REMOVED, with the reason), or nothing. `diff`
does the same for two whole views of the matching tasks, in task id order, so
that two servers computing the events between the same two snapshots compute
the same list: a resume position inside it is then meaningful anywhere.

Stores yield WatchEvents whose `position` is their own opaque bytes (an offset
in the SQLite change log, a pair of Firestore read times); the servicer wraps
it into the caller's resume token.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from taskservice.domain.model import Task, TaskContent, TaskFilter


class ChangeType(enum.IntEnum):
    """Mirrors tasks.v1.WatchTasksResponse.Type (same numbers)."""

    ADDED = 1
    MODIFIED = 2
    REMOVED = 3
    CURRENT = 4
    PROGRESS = 5


class RemovalReason(enum.IntEnum):
    """Mirrors tasks.v1.WatchTasksResponse.RemovalReason (same numbers)."""

    DELETED = 1
    NO_LONGER_MATCHES = 2


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: ChangeType
    position: bytes  # where a resumed watch continues: just after this event
    commit_time_ns: int
    task_id: str = ""
    task: Task | None = None  # unset for a deleted task, CURRENT and PROGRESS
    reason: RemovalReason | None = None  # for REMOVED
    # Replayed from what the store keeps (initial tasks, a resume's backlog):
    # the stream may take its time over these. A watcher that falls behind
    # on live events is ended instead (taskservice.api.watching).
    catching_up: bool = False


@dataclass(frozen=True, slots=True)
class WatchQuery:
    filter: TaskFilter
    after: bytes | None = None  # a position from an earlier event; None: from now
    include_initial: bool = False  # start with every matching task (fresh watches)
    progress_seconds: float = 30.0  # a PROGRESS event after this long without one


@dataclass(frozen=True, slots=True)
class Change:
    """One task's move from one version to another between two points of a
    watch (None: it did not exist, or did not match, there)."""

    type: ChangeType
    task_id: str
    task: Task | None
    reason: RemovalReason | None
    commit_time_ns: int


def matches(task_filter: TaskFilter, content: TaskContent) -> bool:
    """Whether a task with this content passes the filter (the same rule the
    stores' list queries apply)."""
    f = task_filter
    return (
        (f.state is None or content.state == f.state)
        and (f.priority is None or content.priority == f.priority)
        and (f.assignee is None or content.assignee == f.assignee)
        and (f.tag is None or f.tag in content.tags)
    )


def event_for(
    task_filter: TaskFilter, before: Task | None, after: Task | None, commit_time_ns: int
) -> Change | None:
    """What one commit (before -> after; None: absent) means to a watcher of
    task_filter, or None when it does not concern the watcher."""
    was = before is not None and matches(task_filter, before.content)
    now = after is not None and matches(task_filter, after.content)
    either = after if after is not None else before
    task_id = either.task_id if either is not None else ""
    if now and not was:
        return Change(ChangeType.ADDED, task_id, after, None, commit_time_ns)
    if now and was:
        assert before is not None and after is not None
        if after.version == before.version:
            return None
        return Change(ChangeType.MODIFIED, task_id, after, None, commit_time_ns)
    if was:
        if after is None:
            return Change(ChangeType.REMOVED, task_id, None, RemovalReason.DELETED, commit_time_ns)
        return Change(
            ChangeType.REMOVED, task_id, after, RemovalReason.NO_LONGER_MATCHES, commit_time_ns
        )
    return None


def diff(
    old: Mapping[str, Task],
    new: Mapping[str, Task],
    *,
    removed_as: Mapping[str, Task | None],
    snapshot_ns: int,
) -> list[Change]:
    """The changes that turn view `old` into view `new` (each maps task id to
    the matching task), in task id order. A task in old but not in new was
    removed: removed_as[task_id] is the task as it is now (it no longer
    matches) or None (deleted), stamped with snapshot_ns when deleted."""
    out: list[Change] = []
    for task_id in sorted(old.keys() | new.keys()):
        before = old.get(task_id)
        after = new.get(task_id)
        if after is not None:
            if before is None:
                out.append(Change(ChangeType.ADDED, task_id, after, None, after.update_time_ns))
            elif after.version != before.version:
                out.append(Change(ChangeType.MODIFIED, task_id, after, None, after.update_time_ns))
            continue
        now = removed_as.get(task_id)
        if now is None:
            out.append(
                Change(ChangeType.REMOVED, task_id, None, RemovalReason.DELETED, snapshot_ns)
            )
        else:
            out.append(
                Change(
                    ChangeType.REMOVED,
                    task_id,
                    now,
                    RemovalReason.NO_LONGER_MATCHES,
                    now.update_time_ns,
                )
            )
    return out
