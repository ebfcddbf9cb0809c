"""What both stores do the same way: the errors they raise, and an update's
"check the version, then apply the patch".

A store decides *when* a task is missing, stale, or taken; this module says
*what* the caller is told, so both stores tell it in the same words.
"""

from __future__ import annotations

from taskservice.domain.errors import AlreadyExists, EtagMismatch, FailedPrecondition, NotFound
from taskservice.domain.model import Task, TaskContent, TaskPatch


def not_found(task_id: str) -> NotFound:
    return NotFound(f"tasks/{task_id} does not exist")


def stale_etag(task_id: str) -> EtagMismatch:
    return EtagMismatch(f"the etag of tasks/{task_id} is stale")


def taken(task_id: str, index: int) -> AlreadyExists:
    """Item `index` of a create asked for a task_id that exists."""
    return AlreadyExists(f"tasks/{task_id} already exists", index=index, name=f"tasks/{task_id}")


def request_id_of_deleted_task(task_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"request_id was used for tasks/{task_id}, which has since been deleted",
        reason="REQUEST_ID_ALREADY_USED",
    )


def patched(current: Task, patch: TaskPatch, expected_version: int | None) -> TaskContent:
    """current's content with patch applied; EtagMismatch when the caller
    expected another version."""
    if expected_version is not None and expected_version != current.version:
        raise stale_etag(current.task_id)
    return patch.apply(current.content)
