"""The domain model: tasks, changes to them and list queries, as plain dataclasses.

Protobuf types stop at the servicer; stores see only what is defined here.
Times are integer nanoseconds since the Unix epoch (UTC), by the store's clock.

A stored version is named by its write time in whole microseconds (Firestore's
update_time precision; the SQLite store keeps to it), so its etag, the
version in hex, can be checked without a read: an etag that is not a positive
multiple of 1,000 ns below 2**63 was never issued by either store.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

_ETAG = re.compile(r"[0-9a-f]{1,16}")
VERSION_STEP_NS = 1_000  # versions are whole microseconds
_MAX_VERSION = 2**63 - 1
MUTABLE_FIELDS: tuple[str, ...] = ("title", "description", "priority", "state", "assignee", "tags")


class Priority(enum.IntEnum):
    """Mirrors tasks.v1.Task.Priority (same numbers)."""

    UNSPECIFIED = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4


class State(enum.IntEnum):
    """Mirrors tasks.v1.Task.State (same numbers)."""

    UNSPECIFIED = 0
    OPEN = 1
    IN_PROGRESS = 2
    DONE = 3
    CANCELLED = 4


# Members by number: a tuple index is several times cheaper than Priority(n).
PRIORITIES: tuple[Priority, ...] = tuple(Priority)
STATES: tuple[State, ...] = tuple(State)


@dataclass(frozen=True, slots=True)
class TaskContent:
    """The fields a caller sets; validated before a store sees them."""

    title: str
    description: str = ""
    priority: Priority = Priority.MEDIUM
    state: State = State.OPEN
    assignee: str = ""  # "" means nobody
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Task:
    """A stored task. `version` names the stored version (see the module
    docstring); on SQLite it is update_time_ns, on Firestore the document's
    own update time, which is finer than the task's update_time field."""

    task_id: str
    content: TaskContent
    create_time_ns: int
    update_time_ns: int
    version: int

    @property
    def etag(self) -> str:
        return etag_for(self.version)


@dataclass(frozen=True, slots=True)
class NewTask:
    """One task to create. request_id, when set, makes the create idempotent."""

    task_id: str
    content: TaskContent
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class TaskPatch:
    """The fields an update replaces; None leaves a field as it is."""

    title: str | None = None
    description: str | None = None
    priority: Priority | None = None
    state: State | None = None
    assignee: str | None = None
    tags: tuple[str, ...] | None = None

    def apply(self, content: TaskContent) -> TaskContent:
        return TaskContent(
            title=content.title if self.title is None else self.title,
            description=content.description if self.description is None else self.description,
            priority=content.priority if self.priority is None else self.priority,
            state=content.state if self.state is None else self.state,
            assignee=content.assignee if self.assignee is None else self.assignee,
            tags=content.tags if self.tags is None else self.tags,
        )


class OrderField(enum.Enum):
    CREATE_TIME = "create_time"
    UPDATE_TIME = "update_time"


@dataclass(frozen=True, slots=True)
class Ordering:
    """Sort order of a list; ties are broken by task_id in the same direction."""

    field: OrderField = OrderField.CREATE_TIME
    descending: bool = True


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Equality restrictions joined with AND; None means unrestricted."""

    state: State | None = None
    priority: Priority | None = None
    assignee: str | None = None
    tag: str | None = None  # tasks whose tags contain this one


@dataclass(frozen=True, slots=True)
class Cursor:
    """The position of the last task of a page: its sort time and id."""

    time_ns: int
    task_id: str


@dataclass(frozen=True, slots=True)
class ListQuery:
    filter: TaskFilter = field(default_factory=TaskFilter)
    ordering: Ordering = field(default_factory=Ordering)
    limit: int = 50
    after: Cursor | None = None


@dataclass(frozen=True, slots=True)
class ListResult:
    tasks: list[Task]
    has_more: bool  # tasks beyond this page match


def sort_time(task: Task, ordering: Ordering) -> int:
    if ordering.field is OrderField.CREATE_TIME:
        return task.create_time_ns
    return task.update_time_ns


def etag_for(version_ns: int) -> str:
    """The etag of a stored version: the version's write time, in hex."""
    return format(version_ns, "x")


def version_of(etag: str) -> int | None:
    """The version an etag names, or None when no store could have issued it."""
    if _ETAG.fullmatch(etag) is None:
        return None
    version = int(etag, 16)
    if version <= 0 or version > _MAX_VERSION or version % VERSION_STEP_NS:
        return None
    return version
