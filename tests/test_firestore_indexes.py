"""deploy/firestore.indexes.json covers every query shape the Firestore store builds.

The shapes are derived from the code: every combination of TaskFilter fields
(read from the dataclass) and every ordering ListTasks accepts goes through
FirestoreStore.build_query, and the resulting StructuredQuery is inspected.
The emulator does not enforce indexes; real Firestore rejects an uncovered
query, so this test stands in for it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import grpc

from taskservice.domain import validation
from taskservice.domain.model import Cursor, ListQuery, Priority, State, TaskFilter
from taskservice.store.firestore import FirestoreStore
from taskservice.store.firestore._codec import StructuredQuery, encode_content

INDEXES = Path(__file__).resolve().parent.parent / "deploy" / "firestore.indexes.json"
SAMPLE = {"state": State.OPEN, "priority": Priority.HIGH, "assignee": "ana", "tag": "red"}


def _shapes() -> set[tuple[frozenset[str], str | None, str, str]]:
    store = FirestoreStore(grpc.aio.insecure_channel("127.0.0.1:9"), project="demo-shapes")
    names = [f.name for f in dataclasses.fields(TaskFilter)]
    assert set(names) == set(SAMPLE), "a new filter field needs a sample value here"
    shapes = set()
    for n in range(len(names) + 1):
        for chosen in itertools.combinations(names, n):
            task_filter = TaskFilter(**{name: SAMPLE[name] for name in chosen})
            for ordering in validation._ORDERINGS.values():
                for after in (None, Cursor(1, "x")):
                    sq = store.build_query(ListQuery(task_filter, ordering, 20, after))
                    shapes.add(_shape(sq))
    return shapes


def _shape(sq: Any) -> tuple[frozenset[str], str | None, str, str]:
    filters = (
        list(sq.where.composite_filter.filters)
        if sq.where.HasField("composite_filter")
        else ([sq.where] if sq.where.HasField("field_filter") else [])
    )
    equal: set[str] = set()
    contains: str | None = None
    for f in filters:
        ff = f.field_filter
        if ff.op == StructuredQuery.FieldFilter.EQUAL:
            equal.add(ff.field.field_path)
        elif ff.op == StructuredQuery.FieldFilter.ARRAY_CONTAINS:
            assert contains is None, "Firestore allows one array-contains per query"
            contains = ff.field.field_path
        else:
            raise AssertionError(f"unexpected operator {ff.op}")
    orders = [(o.field.field_path, o.direction) for o in sq.order_by]
    assert orders[-1][0] == "__name__", "ties must break on the document name"
    assert len({d for _, d in orders}) == 1, "__name__ must follow the sort direction"
    ((field, direction),) = orders[:-1]
    word = "DESCENDING" if direction == StructuredQuery.DESCENDING else "ASCENDING"
    return frozenset(equal), contains, field, word


def _index_shapes() -> list[tuple[frozenset[str], str | None, str, str]]:
    doc = json.loads(INDEXES.read_text())
    out = []
    for index in doc["indexes"]:
        assert index["collectionGroup"] == "tasks" and index["queryScope"] == "COLLECTION"
        *prefix, last = index["fields"]
        equal = frozenset(f["fieldPath"] for f in prefix if f.get("order") == "ASCENDING")
        contains = [f["fieldPath"] for f in prefix if f.get("arrayConfig") == "CONTAINS"]
        assert len(equal) + len(contains) == len(prefix)
        out.append((equal, contains[0] if contains else None, last["fieldPath"], last["order"]))
    return out


def test_every_query_shape_has_an_index_and_every_index_is_used() -> None:
    shapes = _shapes()
    # A query with no filter is served by the automatic single-field index.
    needing = {s for s in shapes if s[0] or s[1]}
    assert len(shapes) == 64 and len(needing) == 60
    indexes = _index_shapes()
    assert len(indexes) == len(set(indexes)), "duplicate index"
    missing = needing - set(indexes)
    assert not missing, f"query shapes without a composite index: {sorted(map(str, missing))}"
    unused = set(indexes) - needing
    assert not unused, f"indexes no query uses: {sorted(map(str, unused))}"


def test_exactly_the_single_field_indexes_no_query_needs_are_exempted() -> None:
    """Single-field indexes serve only the unfiltered listings, ordered by
    create_time or update_time (either way); every filtered listing has its
    composite index. So every other field of a task document is exempted
    (fewer index writes per write), and so is every field of the request-id
    markers, which are only ever read by name (their expire_time grows with
    time: indexed, it would be a write hotspot)."""
    from taskservice.domain.model import TaskContent

    by_single_field = {
        field for equal, contains, field, _ in _shapes() if not equal and not contains
    }
    assert by_single_field == {"create_time", "update_time"}
    task_fields = set(encode_content(TaskContent("t")))  # what the store writes
    task_fields |= {"create_time", "update_time"}
    doc = json.loads(INDEXES.read_text())
    exempt = {
        (o["collectionGroup"], o["fieldPath"]) for o in doc["fieldOverrides"] if o["indexes"] == []
    }
    assert exempt == {("tasks", f) for f in task_fields - by_single_field} | {
        ("tasks-requests", "task_id"),
        ("tasks-requests", "expire_time"),
    }
    marker = FirestoreStore(grpc.aio.insecure_channel("127.0.0.1:9"), project="demo-x")
    write = marker._request_write("0b6c1e9a-3f1e-4a55-9d7e-2f3c8f1f0a11", "t")
    assert set(write.update.fields) == {"task_id", "expire_time"}


def test_the_index_commands_follow_the_collection() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            str(INDEXES.parent / "index_commands.py"),
            str(INDEXES),
            "--project",
            "demo-p",
            "--collection",
            "todo",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert sum("--collection-group=todo " in line for line in lines) == 60 + 6
    assert sum("--collection-group=todo-requests " in line for line in lines) == 2 + 1
    assert not any("=tasks" in line for line in lines)
