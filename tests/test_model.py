"""Unit tests of taskservice.domain.model and taskservice.domain.limits, against the contract."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tasks.v1 import task_service_pb2 as pb

from taskservice.api.convert import to_proto
from taskservice.domain.errors import InvalidArgument
from taskservice.domain.limits import (
    MAX_BATCH_RESPONSE_BYTES,
    MAX_PAGE_SIZE,
    TAG_MAX,
    TAGS_MAX,
)
from taskservice.domain.model import MUTABLE_FIELDS, Priority, State, Task, TaskContent, TaskPatch
from taskservice.domain.sizes import (
    check_batch_response_size,
    repeated_tasks_size,
    task_size_bound,
)


def test_the_enums_mirror_the_proto() -> None:
    """model.Priority and model.State say they mirror tasks.v1: they do."""
    for enum, proto in ((Priority, pb.Task.Priority), (State, pb.Task.State)):
        prefix = proto.DESCRIPTOR.name.upper() + "_"
        assert {m.name: m.value for m in enum} == {
            name.removeprefix(prefix): value for name, value in proto.items()
        }


def test_the_mutable_fields_are_the_task_fields_that_are_not_output_only() -> None:
    from google.api import field_behavior_pb2

    output_only = field_behavior_pb2.OUTPUT_ONLY
    identifier = field_behavior_pb2.IDENTIFIER
    mutable = []
    for field in pb.Task.DESCRIPTOR.fields:
        behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if output_only not in behaviors and identifier not in behaviors and field.name != "etag":
            mutable.append(field.name)
    assert tuple(mutable) == MUTABLE_FIELDS


def test_a_patch_replaces_only_what_it_names() -> None:
    content = TaskContent("t", "d", Priority.LOW, State.OPEN, "ana", ("a",))
    assert TaskPatch().apply(content) == content
    assert TaskPatch(state=State.DONE, tags=()).apply(content) == TaskContent(
        "t", "d", Priority.LOW, State.DONE, "ana", ()
    )


text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    title=st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=200),
    description=st.text(st.characters(blacklist_categories=["Cs"]), max_size=2000),
    assignee=text,
    tags=st.lists(st.text(min_size=1, max_size=TAG_MAX), max_size=TAGS_MAX),
    priority=st.sampled_from(list(Priority)[1:]),
    state=st.sampled_from(list(State)[1:]),
    version=st.integers(1, 2**63 - 1),
    created=st.integers(0, 2**62),
)
def test_the_size_bound_is_never_below_the_real_size(
    title: str,
    description: str,
    assignee: str,
    tags: list[str],
    priority: Priority,
    state: State,
    version: int,
    created: int,
) -> None:
    content = TaskContent(title, description, priority, state, assignee, tuple(tags))
    task = Task("a-task-id", content, created, created + 5, version)
    real = to_proto(task).ByteSize()
    bound = task_size_bound(task.task_id, content)
    assert real <= bound <= real + 40
    response = pb.BatchCreateTasksResponse(tasks=[to_proto(task)] * 3)
    assert response.ByteSize() <= repeated_tasks_size([(task.task_id, content)] * 3)


def test_a_full_page_of_the_largest_tasks_fits_a_default_client() -> None:
    wide = "\U0001f600"
    largest = TaskContent(
        wide * 200,
        wide * 2000,
        Priority.HIGH,
        State.OPEN,
        wide * 256,
        tuple(f"{i:02d}" + wide * (TAG_MAX - 2) for i in range(TAGS_MAX)),
    )
    page = repeated_tasks_size([("a" * 63, largest)] * MAX_PAGE_SIZE)
    assert page < 4 * 1024 * 1024 - 1024
    with pytest.raises(InvalidArgument) as info:
        check_batch_response_size([("a" * 63, largest)] * 500)
    assert info.value.reason == "BATCH_RESPONSE_TOO_LARGE"
    assert int(info.value.metadata["size_bytes"]) > MAX_BATCH_RESPONSE_BYTES
