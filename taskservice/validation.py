"""Request validation: protobuf requests in, domain values out, or InvalidArgument.

Every violation names the field path the caller sent (task.title, task_id,
update_mask, page_size, ...). Lengths count characters (code points), not
bytes. All violations of one message are reported together.
"""

from __future__ import annotations

import os
import re

from tasks.v1 import task_service_pb2 as pb

from taskservice.errors import InvalidArgument
from taskservice.model import (
    MUTABLE_FIELDS,
    NewTask,
    OrderField,
    Ordering,
    Priority,
    State,
    TaskContent,
    TaskPatch,
    version_of,
)

TITLE_MAX = 200
DESCRIPTION_MAX = 2000
ASSIGNEE_MAX = 256
TAG_MAX = 64
TAGS_MAX = 32
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

TASK_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_EXCEPT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_OUTPUT_ONLY = frozenset({"name", "create_time", "update_time", "etag"})
_ORDERINGS = {
    "create_time desc": Ordering(OrderField.CREATE_TIME, descending=True),
    "create_time": Ordering(OrderField.CREATE_TIME, descending=False),
    "update_time desc": Ordering(OrderField.UPDATE_TIME, descending=True),
    "update_time": Ordering(OrderField.UPDATE_TIME, descending=False),
}
_PRIORITIES = {p.value for p in Priority}
_STATES = {s.value for s in State if s.value}

Violations = list[tuple[str, str]]


def new_task_id() -> str:
    """A random (version 4) UUID in its canonical text form; the same as
    str(uuid.uuid4()) at half the cost, which CreateTask pays on every call."""
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


def task_id_from_name(name: str, field: str) -> str:
    """The id in "tasks/{task_id}"; INVALID_ARGUMENT naming `field` otherwise."""
    if not name:
        raise InvalidArgument([(field, "is required, as tasks/{task_id}")])
    collection, slash, task_id = name.partition("/")
    if collection != "tasks" or not slash or TASK_ID.fullmatch(task_id) is None:
        raise InvalidArgument(
            [(field, "must be tasks/{task_id}, task_id being 1-63 of [a-z0-9-]")],
            reason="INVALID_NAME",
        )
    return task_id


def _title(value: str, path: str, out: Violations) -> None:
    if not value.strip():
        out.append((path, "is required and must not be blank"))
    elif len(value) > TITLE_MAX:
        out.append((path, f"must be at most {TITLE_MAX} characters, got {len(value)}"))
    elif _CONTROL.search(value):
        out.append((path, "must not contain control characters"))


def _description(value: str, path: str, out: Violations) -> None:
    if len(value) > DESCRIPTION_MAX:
        out.append((path, f"must be at most {DESCRIPTION_MAX} characters, got {len(value)}"))
    elif _CONTROL_EXCEPT_WHITESPACE.search(value):
        out.append((path, "must not contain control characters other than tab and newline"))


def _assignee(value: str, path: str, out: Violations) -> None:
    if len(value) > ASSIGNEE_MAX:
        out.append((path, f"must be at most {ASSIGNEE_MAX} characters, got {len(value)}"))
    elif _CONTROL.search(value):
        out.append((path, "must not contain control characters"))


def _tags(values: list[str], path: str, out: Violations) -> None:
    if len(values) > TAGS_MAX:
        out.append((path, f"must hold at most {TAGS_MAX} tags, got {len(values)}"))
        return
    seen: set[str] = set()
    for i, tag in enumerate(values):
        if not tag.strip():
            out.append((f"{path}[{i}]", "must not be empty or blank"))
        elif len(tag) > TAG_MAX:
            out.append((f"{path}[{i}]", f"must be at most {TAG_MAX} characters, got {len(tag)}"))
        elif _CONTROL.search(tag):
            out.append((f"{path}[{i}]", "must not contain control characters"))
        elif tag in seen:
            out.append((f"{path}[{i}]", f"repeats the tag {tag!r}"))
        seen.add(tag)


def _priority(value: int, path: str, out: Violations) -> Priority:
    if value not in _PRIORITIES:
        out.append((path, f"{value} is not a Priority value"))
        return Priority.MEDIUM
    return Priority(value) if value else Priority.MEDIUM


def _state(value: int, path: str, out: Violations) -> State:
    if value not in _STATES:
        out.append((path, f"{value} is not a settable State (STATE_OPEN..STATE_CANCELLED)"))
        return State.OPEN
    return State(value)


def _etag(value: str, path: str, out: Violations) -> str | None:
    if not value:
        return None
    if version_of(value) is None:
        out.append((path, "is not an etag this service issued"))
    return value


def new_task(request: pb.CreateTaskRequest) -> NewTask:
    """Validates a CreateTaskRequest (also one item of a batch)."""
    out: Violations = []
    if not request.HasField("task"):
        raise InvalidArgument([("task", "is required")])
    task = request.task
    _title(task.title, "task.title", out)
    _description(task.description, "task.description", out)
    priority = _priority(task.priority, "task.priority", out)
    _assignee(task.assignee, "task.assignee", out)
    _tags(list(task.tags), "task.tags", out)
    task_id = request.task_id
    if task_id and TASK_ID.fullmatch(task_id) is None:
        out.append(("task_id", "must match ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ (1-63 characters)"))
    request_id: str | None = None
    if request.request_id:
        if _UUID.fullmatch(request.request_id) is None:
            out.append(("request_id", "must be a UUID, e.g. 123e4567-e89b-42d3-a456-426614174000"))
        else:
            request_id = request.request_id.lower()
    if out:
        raise InvalidArgument(out)
    return NewTask(
        task_id=task_id or new_task_id(),
        content=TaskContent(
            title=task.title,
            description=task.description,
            priority=priority,
            state=State.OPEN,
            assignee=task.assignee,
            tags=tuple(task.tags),
        ),
        request_id=request_id,
    )


def update(request: pb.UpdateTaskRequest) -> tuple[str, TaskPatch, str | None]:
    """Validates an UpdateTaskRequest: (task_id, patch, expected etag or None)."""
    if not request.HasField("task"):
        raise InvalidArgument([("task", "is required")])
    task = request.task
    task_id = task_id_from_name(task.name, "task.name")
    out: Violations = []
    if request.HasField("update_mask"):
        paths: set[str] = set()
        for i, path in enumerate(request.update_mask.paths):
            if path == "*":
                if len(request.update_mask.paths) != 1:
                    out.append((f"update_mask.paths[{i}]", '"*" must be the only path'))
                paths.update(MUTABLE_FIELDS)
            elif path in MUTABLE_FIELDS:
                paths.add(path)
            elif path not in _OUTPUT_ONLY:  # output-only paths are ignored (AIP-203)
                out.append(
                    (
                        f"update_mask.paths[{i}]",
                        f"{path!r} is not a field of Task that can be updated"
                        f" ({', '.join(MUTABLE_FIELDS)})",
                    )
                )
    else:
        paths = {
            name
            for name, populated in (
                ("title", bool(task.title)),
                ("description", bool(task.description)),
                ("priority", task.priority != 0),
                ("state", task.state != 0),
                ("assignee", task.HasField("assignee")),
                ("tags", len(task.tags) > 0),
            )
            if populated
        }
    etag = _etag(task.etag, "task.etag", out)
    if out:
        raise InvalidArgument(out)
    if not paths:
        raise InvalidArgument([("update_mask", "names no field to update")])
    patch = TaskPatch(
        title=task.title if "title" in paths else None,
        description=task.description if "description" in paths else None,
        priority=_priority(task.priority, "task.priority", out) if "priority" in paths else None,
        state=_state(task.state, "task.state", out) if "state" in paths else None,
        assignee=task.assignee if "assignee" in paths else None,
        tags=tuple(task.tags) if "tags" in paths else None,
    )
    if patch.title is not None:
        _title(patch.title, "task.title", out)
    if patch.description is not None:
        _description(patch.description, "task.description", out)
    if patch.assignee is not None:
        _assignee(patch.assignee, "task.assignee", out)
    if patch.tags is not None:
        _tags(list(patch.tags), "task.tags", out)
    if out:
        raise InvalidArgument(out)
    return task_id, patch, etag


def delete(request: pb.DeleteTaskRequest) -> tuple[str, str | None]:
    task_id = task_id_from_name(request.name, "name")
    out: Violations = []
    etag = _etag(request.etag, "etag", out)
    if out:
        raise InvalidArgument(out)
    return task_id, etag


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument([("page_size", "must not be negative")])
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def ordering(order_by: str) -> Ordering:
    key = " ".join(order_by.split())
    if not key:
        return _ORDERINGS["create_time desc"]
    found = _ORDERINGS.get(key)
    if found is None:
        choices = ", ".join(f'"{k}"' for k in _ORDERINGS)
        raise InvalidArgument(
            [("order_by", f"must be one of {choices}")], reason="INVALID_ORDER_BY"
        )
    return found
