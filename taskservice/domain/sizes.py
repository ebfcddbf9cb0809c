"""The encoded size of what a call returns, bounded before it is written: a
task as tasks.v1.Task, a batch's tasks as BatchCreateTasksResponse.tasks, and
the check that a batch's response stays within limits.MAX_BATCH_RESPONSE_BYTES."""

from __future__ import annotations

from collections.abc import Iterable

from taskservice.domain.errors import InvalidArgument
from taskservice.domain.limits import MAX_BATCH_RESPONSE_BYTES
from taskservice.domain.model import TaskContent


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _string_field(text: str) -> int:
    """A non-empty string field with a one-byte tag, as protobuf encodes it."""
    n = len(text.encode())
    return 1 + _varint_size(n) + n if n else 0


# create_time and update_time (tag, length, seconds and nanos varints at their
# widest for times before year 2514), the etag (at most 16 hex digits), and the
# two enums: the parts of a returned Task that do not depend on its content.
_FIXED_PART = 2 * (1 + 1 + 1 + 5 + 1 + 5) + (1 + 1 + 16) + 2 * 2


def task_size_bound(task_id: str, content: TaskContent) -> int:
    """An upper bound of the encoded size of tasks.v1.Task for this task as the
    service returns it (exact but for the times and etag, taken at their
    widest)."""
    size = _FIXED_PART + _string_field("tasks/" + task_id)
    size += _string_field(content.title) + _string_field(content.description)
    size += _string_field(content.assignee)
    for tag in content.tags:
        size += 1 + _varint_size(len(tag.encode())) + len(tag.encode())
    return size


def repeated_tasks_size(tasks: Iterable[tuple[str, TaskContent]]) -> int:
    """An upper bound of the encoded size of a message holding these tasks as
    its repeated Task field (BatchCreateTasksResponse.tasks)."""
    total = 0
    for task_id, content in tasks:
        size = task_size_bound(task_id, content)
        total += 1 + _varint_size(size) + size
    return total


def check_batch_response_size(tasks: Iterable[tuple[str, TaskContent]]) -> None:
    """Raises InvalidArgument (BATCH_RESPONSE_TOO_LARGE, before anything is
    written) when the tasks a batch would return exceed MAX_BATCH_RESPONSE_BYTES."""
    size = repeated_tasks_size(tasks)
    if size > MAX_BATCH_RESPONSE_BYTES:
        raise InvalidArgument(
            [
                (
                    "requests",
                    f"the tasks would return {size} bytes, over the limit of"
                    f" {MAX_BATCH_RESPONSE_BYTES} for one call; send fewer or smaller"
                    " tasks per call; nothing was written",
                )
            ],
            reason="BATCH_RESPONSE_TOO_LARGE",
            metadata={"limit_bytes": str(MAX_BATCH_RESPONSE_BYTES), "size_bytes": str(size)},
        )
