"""The rules for each value a caller sends, checked once, here.

Functions take plain values (no protobuf: taskservice.api.convert reads the
messages) and either return the value as the service will use it or append a
(field path, problem) violation to `out`. Lengths count characters (code
points), not bytes. A text made only of whitespace and invisible characters
(format characters such as U+200B and U+FEFF, and fillers such as U+3164)
counts as blank. Tags are NFC-normalized before they are checked, stored or
compared, so two spellings of one tag are one tag.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence

from taskservice.domain.errors import InvalidArgument, Violation, clip
from taskservice.domain.limits import (
    ASSIGNEE_MAX,
    DEFAULT_PAGE_SIZE,
    DESCRIPTION_MAX,
    MAX_MASK_PATHS,
    MAX_PAGE_SIZE,
    TAG_MAX,
    TAGS_MAX,
    TASK_ID_MAX,
    TITLE_MAX,
)
from taskservice.domain.model import (
    MUTABLE_FIELDS,
    OrderField,
    Ordering,
    Priority,
    State,
    version_of,
)

TASK_ID = re.compile(rf"[a-z0-9](?:[a-z0-9-]{{0,{TASK_ID_MAX - 2}}}[a-z0-9])?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_EXCEPT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Letters and marks that render as nothing (Hangul and Mongolian fillers, the
# braille blank, the combining grapheme joiner), beside the format characters.
_INVISIBLE = frozenset("\u034f\u115f\u1160\u180e\u2800\u3164\uffa0")
OUTPUT_ONLY_FIELDS = ("name", "create_time", "update_time", "etag")
_ORDERINGS = {
    "create_time desc": Ordering(OrderField.CREATE_TIME, descending=True),
    "create_time": Ordering(OrderField.CREATE_TIME, descending=False),
    "update_time desc": Ordering(OrderField.UPDATE_TIME, descending=True),
    "update_time": Ordering(OrderField.UPDATE_TIME, descending=False),
}
_PRIORITIES = {p.value for p in Priority}
_STATES = {s.value for s in State if s.value}


def new_task_id() -> str:
    """A random (version 4) UUID in its canonical text form; the same as
    str(uuid.uuid4()) at half the cost, which CreateTask pays on every call."""
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


def is_blank(text: str) -> bool:
    """True when text shows nothing: only whitespace and invisible characters."""
    return all(ch.isspace() or ch in _INVISIBLE or unicodedata.category(ch) == "Cf" for ch in text)


def task_id_from_name(name: str, field: str) -> str:
    """The id in "tasks/{task_id}"; INVALID_ARGUMENT naming `field` otherwise."""
    if not name:
        raise InvalidArgument([(field, "is required, as tasks/{task_id}")])
    collection, slash, task_id = name.partition("/")
    if collection != "tasks" or not slash or TASK_ID.fullmatch(task_id) is None:
        raise InvalidArgument(
            [(field, f"must be tasks/{{task_id}}, task_id being 1-{TASK_ID_MAX} of [a-z0-9-]")],
            reason="INVALID_NAME",
        )
    return task_id


def check_task_id(value: str, path: str, out: list[Violation]) -> None:
    if TASK_ID.fullmatch(value) is None:
        inner = f"[a-z0-9-]{{0,{TASK_ID_MAX - 2}}}"
        out.append((path, f"must match ^[a-z0-9]({inner}[a-z0-9])?$ (1-{TASK_ID_MAX} characters)"))


def request_id(value: str, path: str, out: list[Violation]) -> str | None:
    """The request_id in canonical (lower-case) form; None when unset."""
    if not value:
        return None
    if _UUID.fullmatch(value) is None:
        out.append((path, "must be a UUID, e.g. 123e4567-e89b-42d3-a456-426614174000"))
        return None
    return value.lower()


def check_title(value: str, path: str, out: list[Violation]) -> None:
    if len(value) > TITLE_MAX:
        out.append((path, f"must be at most {TITLE_MAX} characters, got {len(value)}"))
    elif _CONTROL.search(value):
        out.append((path, "must not contain control characters"))
    elif is_blank(value):
        out.append((path, "is required and must not be blank (or only invisible characters)"))


def check_description(value: str, path: str, out: list[Violation]) -> None:
    if len(value) > DESCRIPTION_MAX:
        out.append((path, f"must be at most {DESCRIPTION_MAX} characters, got {len(value)}"))
    elif _CONTROL_EXCEPT_WHITESPACE.search(value):
        out.append((path, "must not contain control characters other than tab and newline"))


def check_assignee(value: str, path: str, out: list[Violation]) -> None:
    if len(value) > ASSIGNEE_MAX:
        out.append((path, f"must be at most {ASSIGNEE_MAX} characters, got {len(value)}"))
    elif _CONTROL.search(value):
        out.append((path, "must not contain control characters"))


def normalize_tag(tag: str) -> str:
    return unicodedata.normalize("NFC", tag)


def tags(values: Sequence[str], path: str, out: list[Violation]) -> tuple[str, ...]:
    """The tags, NFC-normalized; every rule checked on the normalized form."""
    if len(values) > TAGS_MAX:
        out.append((path, f"must hold at most {TAGS_MAX} tags, got {len(values)}"))
        return ()
    normalized = tuple(normalize_tag(t) for t in values)
    seen: dict[str, int] = {}
    for i, tag in enumerate(normalized):
        if len(tag) > TAG_MAX:
            out.append((f"{path}[{i}]", f"must be at most {TAG_MAX} characters, got {len(tag)}"))
        elif _CONTROL.search(tag):
            out.append((f"{path}[{i}]", "must not contain control characters"))
        elif is_blank(tag):
            out.append((f"{path}[{i}]", "must not be empty, blank or only invisible characters"))
        elif tag in seen:
            out.append((f"{path}[{i}]", f"repeats {path}[{seen[tag]}] (compared in NFC)"))
        seen.setdefault(tag, i)
    return normalized


def priority(value: int, path: str, out: list[Violation]) -> Priority:
    """UNSPECIFIED means MEDIUM."""
    if value not in _PRIORITIES:
        out.append((path, f"{value} is not a Priority value"))
        return Priority.MEDIUM
    return Priority(value) if value else Priority.MEDIUM


def state(value: int, path: str, out: list[Violation]) -> State:
    if value not in _STATES:
        out.append((path, f"{value} is not a settable State (STATE_OPEN..STATE_CANCELLED)"))
        return State.OPEN
    return State(value)


def etag(value: str, path: str, out: list[Violation]) -> int | None:
    """The version an etag names; None when unset. An etag no store could
    have issued is a violation (a well-formed but stale one is not: the store
    answers ABORTED)."""
    if not value:
        return None
    version = version_of(value)
    if version is None:
        out.append((path, "is not an etag this service issued; read the task for its etag"))
    return version


def mask_fields(paths: Sequence[str]) -> frozenset[str]:
    """The mutable fields an update_mask names. Output-only paths are ignored
    (AIP-203); unknown paths, a "*" beside other paths, more than
    MAX_MASK_PATHS paths, and a mask that leaves nothing to update are
    INVALID_ARGUMENT."""
    if len(paths) > MAX_MASK_PATHS:
        raise InvalidArgument(
            [("update_mask.paths", f"names {len(paths)} paths; at most {MAX_MASK_PATHS}")]
        )
    out: list[Violation] = []
    fields: set[str] = set()
    for i, path in enumerate(paths):
        if path == "*":
            if len(paths) != 1:
                out.append((f"update_mask.paths[{i}]", '"*" must be the only path'))
            fields.update(MUTABLE_FIELDS)
        elif path in MUTABLE_FIELDS:
            fields.add(path)
        elif path not in OUTPUT_ONLY_FIELDS:
            out.append(
                (
                    f"update_mask.paths[{i}]",
                    f"{clip(path, 64)!r} is not a field of Task that can be updated"
                    f" ({', '.join(MUTABLE_FIELDS)})",
                )
            )
    if out:
        raise InvalidArgument(out)
    if not fields:
        raise InvalidArgument(
            [
                (
                    "update_mask",
                    "names only output-only fields, which are ignored: nothing to update"
                    f" (updatable: {', '.join(MUTABLE_FIELDS)})",
                )
            ]
        )
    return frozenset(fields)


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
