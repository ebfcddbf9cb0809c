"""The TaskService contract, run over a real server and channel against both stores."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from tasks.v1 import task_service_pb2 as pb

from harness import Running
from tests.helpers import create_request, expect_error, stream_of

IA = grpc.StatusCode.INVALID_ARGUMENT


# -- create / get -----------------------------------------------------------


async def test_create_sets_defaults_and_output_fields(running: Running) -> None:
    before = pb.Task(title="x").create_time  # unset
    request = create_request(
        "Write the docs",
        description="all of them",
        assignee="ana@example.com",
        tags=["docs", "v1"],
        state=pb.Task.STATE_DONE,  # ignored: every new task is OPEN
    )
    request.task.name = "tasks/ignored"
    request.task.etag = "ignored"
    task = await running.stub.CreateTask(request)
    assert task.name.startswith("tasks/") and task.name != "tasks/ignored"
    assert str(uuid.UUID(task.name.removeprefix("tasks/"))) == task.name.removeprefix("tasks/")
    assert task.title == "Write the docs"
    assert task.description == "all of them"
    assert task.priority == pb.Task.PRIORITY_MEDIUM
    assert task.state == pb.Task.STATE_OPEN
    assert task.assignee == "ana@example.com"
    assert list(task.tags) == ["docs", "v1"]
    assert task.create_time != before and task.create_time == task.update_time
    assert task.etag and task.etag != "ignored"
    got = await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
    assert got == task


async def test_create_with_task_id_and_taken_id(running: Running) -> None:
    task = await running.stub.CreateTask(
        create_request("first", task_id="my-task-1", priority=pb.Task.PRIORITY_HIGH)
    )
    assert task.name == "tasks/my-task-1"
    assert task.priority == pb.Task.PRIORITY_HIGH
    assert not task.HasField("assignee")
    details = await expect_error(
        running.stub.CreateTask(create_request("second", task_id="my-task-1")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details.reason == "TASK_ALREADY_EXISTS"
    assert details.metadata["name"] == "tasks/my-task-1"
    assert (await running.stub.GetTask(pb.GetTaskRequest(name="tasks/my-task-1"))).title == "first"


async def test_get_missing_and_bad_names(running: Running) -> None:
    details = await expect_error(
        running.stub.GetTask(pb.GetTaskRequest(name="tasks/nope")), grpc.StatusCode.NOT_FOUND
    )
    assert details.reason == "TASK_NOT_FOUND"
    for name in [
        "",
        "tasks/",
        "task/abc",
        "tasks/ABC",
        "tasks/a/b",
        "tasks/../x",
        "tasks/-a",
        "abc",
    ]:
        details = await expect_error(running.stub.GetTask(pb.GetTaskRequest(name=name)), IA)
        assert details.fields == ["name"], name


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("task"), "task"),
        (lambda r: setattr(r.task, "title", ""), "task.title"),
        (lambda r: setattr(r.task, "title", "   "), "task.title"),
        (lambda r: setattr(r.task, "title", "x" * 201), "task.title"),
        (lambda r: setattr(r.task, "title", "bell\x07"), "task.title"),
        (lambda r: setattr(r.task, "description", "d" * 2001), "task.description"),
        (lambda r: setattr(r.task, "priority", 9), "task.priority"),
        (lambda r: setattr(r.task, "assignee", "a" * 257), "task.assignee"),
        (lambda r: r.task.tags.extend(["t"] * 1 + [f"t{i}" for i in range(32)]), "task.tags"),
        (lambda r: r.task.tags.extend(["ok", ""]), "task.tags[1]"),
        (lambda r: r.task.tags.extend(["x" * 65]), "task.tags[0]"),
        (lambda r: r.task.tags.extend(["dup", "dup"]), "task.tags[1]"),
        (lambda r: setattr(r, "task_id", "Upper"), "task_id"),
        (lambda r: setattr(r, "task_id", "a" * 64), "task_id"),
        (lambda r: setattr(r, "task_id", "ends-with-"), "task_id"),
        (lambda r: setattr(r, "task_id", "new\n"), "task_id"),
        (lambda r: setattr(r, "request_id", "not-a-uuid"), "request_id"),
    ],
)
async def test_create_rejects_bad_input_naming_the_field(running: Running, mutate, field) -> None:  # type: ignore[no-untyped-def]
    request = create_request("valid title")
    mutate(request)
    details = await expect_error(running.stub.CreateTask(request), IA)
    assert field in details.fields
    listed = await running.stub.ListTasks(pb.ListTasksRequest())
    assert list(listed.tasks) == []


async def test_lengths_count_characters_not_bytes(running: Running) -> None:
    title = "é" * 200  # 400 bytes
    task = await running.stub.CreateTask(create_request(title, tags=["ü" * 64]))
    assert task.title == title
    await expect_error(running.stub.CreateTask(create_request("é" * 201)), IA)


async def test_several_violations_are_reported_together(running: Running) -> None:
    request = create_request("", task_id="BAD", tags=[""])
    details = await expect_error(running.stub.CreateTask(request), IA)
    assert set(details.fields) == {"task.title", "task_id", "task.tags[0]"}


# -- request_id ---------------------------------------------------------------


async def test_request_id_makes_create_idempotent(running: Running) -> None:
    request_id = str(uuid.uuid4())
    first = await running.stub.CreateTask(create_request("once", request_id=request_id))
    again = await running.stub.CreateTask(create_request("once", request_id=request_id))
    assert again == first
    listed = await running.stub.ListTasks(pb.ListTasksRequest())
    assert [t.name for t in listed.tasks] == [first.name]


async def test_racing_retries_with_one_request_id_create_one_task(running: Running) -> None:
    request_id = str(uuid.uuid4())
    results = await asyncio.gather(
        *(running.stub.CreateTask(create_request("race", request_id=request_id)) for _ in range(8))
    )
    assert len({r.name for r in results}) == 1
    assert len({r.etag for r in results}) == 1
    listed = await running.stub.ListTasks(pb.ListTasksRequest())
    assert len(listed.tasks) == 1


async def test_request_id_with_task_id_retry(running: Running) -> None:
    request_id = str(uuid.uuid4())
    first = await running.stub.CreateTask(
        create_request("t", task_id="fixed", request_id=request_id)
    )
    again = await running.stub.CreateTask(
        create_request("t", task_id="fixed", request_id=request_id)
    )
    assert again == first
    # The same task_id without the request_id is a real conflict.
    await expect_error(
        running.stub.CreateTask(create_request("t", task_id="fixed")),
        grpc.StatusCode.ALREADY_EXISTS,
    )


# -- update -----------------------------------------------------------------


async def test_update_with_mask_changes_only_masked_fields(running: Running) -> None:
    task = await running.stub.CreateTask(create_request("old", description="keep", tags=["a"]))
    update = pb.Task(name=task.name, title="new", description="ignored", state=pb.Task.STATE_DONE)
    updated = await running.stub.UpdateTask(
        pb.UpdateTaskRequest(
            task=update, update_mask=field_mask_pb2.FieldMask(paths=["title", "state"])
        )
    )
    assert updated.title == "new"
    assert updated.description == "keep"
    assert updated.state == pb.Task.STATE_DONE
    assert list(updated.tags) == ["a"]
    assert updated.etag != task.etag
    assert updated.create_time == task.create_time
    assert updated.update_time.ToNanoseconds() >= task.update_time.ToNanoseconds()
    assert await running.stub.GetTask(pb.GetTaskRequest(name=task.name)) == updated


async def test_update_without_mask_uses_populated_fields(running: Running) -> None:
    task = await running.stub.CreateTask(
        create_request(
            "t", description="d", assignee="bob", tags=["x"], priority=pb.Task.PRIORITY_LOW
        )
    )
    updated = await running.stub.UpdateTask(
        pb.UpdateTaskRequest(
            task=pb.Task(name=task.name, priority=pb.Task.PRIORITY_CRITICAL, assignee="")
        )
    )
    assert updated.priority == pb.Task.PRIORITY_CRITICAL
    assert not updated.HasField("assignee")  # explicitly set to "" clears it
    assert updated.title == "t" and updated.description == "d" and list(updated.tags) == ["x"]


async def test_update_star_replaces_all_mutable_fields(running: Running) -> None:
    task = await running.stub.CreateTask(
        create_request("t", description="d", tags=["x"], assignee="a")
    )
    updated = await running.stub.UpdateTask(
        pb.UpdateTaskRequest(
            task=pb.Task(name=task.name, title="only title", state=pb.Task.STATE_IN_PROGRESS),
            update_mask=field_mask_pb2.FieldMask(paths=["*"]),
        )
    )
    assert updated.title == "only title"
    assert updated.description == ""
    assert list(updated.tags) == []
    assert not updated.HasField("assignee")
    assert updated.priority == pb.Task.PRIORITY_MEDIUM
    assert updated.state == pb.Task.STATE_IN_PROGRESS


async def test_update_mask_errors_and_output_only_paths(running: Running) -> None:
    task = await running.stub.CreateTask(create_request("t"))
    mask = field_mask_pb2.FieldMask(paths=["title", "bogus"])
    details = await expect_error(
        running.stub.UpdateTask(
            pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="x"), update_mask=mask)
        ),
        IA,
    )
    assert details.fields == ["update_mask.paths[1]"]
    # Output-only paths are ignored (AIP-203), the rest applies.
    mask = field_mask_pb2.FieldMask(paths=["create_time", "etag", "title"])
    updated = await running.stub.UpdateTask(
        pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="x"), update_mask=mask)
    )
    assert updated.title == "x" and updated.create_time == task.create_time
    # A mask naming only output-only fields updates nothing: rejected.
    await expect_error(
        running.stub.UpdateTask(
            pb.UpdateTaskRequest(
                task=pb.Task(name=task.name), update_mask=field_mask_pb2.FieldMask(paths=["name"])
            )
        ),
        IA,
    )
    # Masked fields are validated.
    details = await expect_error(
        running.stub.UpdateTask(
            pb.UpdateTaskRequest(
                task=pb.Task(name=task.name),
                update_mask=field_mask_pb2.FieldMask(paths=["title", "state"]),
            )
        ),
        IA,
    )
    assert set(details.fields) == {"task.title", "task.state"}


async def test_update_etag_and_missing(running: Running) -> None:
    task = await running.stub.CreateTask(create_request("t"))
    first = await running.stub.UpdateTask(
        pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="one", etag=task.etag))
    )
    details = await expect_error(
        running.stub.UpdateTask(
            pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="two", etag=task.etag))
        ),
        grpc.StatusCode.ABORTED,
    )
    assert details.reason == "ETAG_MISMATCH"
    assert (await running.stub.GetTask(pb.GetTaskRequest(name=task.name))).title == "one"
    await running.stub.UpdateTask(
        pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="two", etag=first.etag))
    )
    await expect_error(
        running.stub.UpdateTask(
            pb.UpdateTaskRequest(task=pb.Task(name="tasks/missing", title="x"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    details = await expect_error(
        running.stub.UpdateTask(
            pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="x", etag="zz!"))
        ),
        IA,
    )
    assert details.fields == ["task.etag"]
    await expect_error(
        running.stub.UpdateTask(pb.UpdateTaskRequest(task=pb.Task(name="bad", title="x"))), IA
    )


async def test_concurrent_updates_lose_no_write(running: Running) -> None:
    """Racing updates of different fields all survive (read-modify-write is guarded)."""
    task = await running.stub.CreateTask(create_request("t"))
    changes = [
        pb.Task(name=task.name, title="new title"),
        pb.Task(name=task.name, description="new description"),
        pb.Task(name=task.name, priority=pb.Task.PRIORITY_CRITICAL),
        pb.Task(name=task.name, state=pb.Task.STATE_DONE),
        pb.Task(name=task.name, assignee="someone"),
        pb.Task(name=task.name, tags=["t1", "t2"]),
    ]
    await asyncio.gather(*(running.stub.UpdateTask(pb.UpdateTaskRequest(task=c)) for c in changes))
    final = await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
    assert final.title == "new title"
    assert final.description == "new description"
    assert final.priority == pb.Task.PRIORITY_CRITICAL
    assert final.state == pb.Task.STATE_DONE
    assert final.assignee == "someone"
    assert list(final.tags) == ["t1", "t2"]


async def test_a_burst_of_blind_updates_to_one_task_all_succeed(running: Running) -> None:
    """32 callers update the same task at once, without etags: each call is
    applied (none is answered ABORTED), and the task ends as one of them left it."""
    task = await running.stub.CreateTask(create_request("t"))
    titles = [f"writer {i}" for i in range(32)]
    results = await asyncio.gather(
        *(
            running.stub.UpdateTask(
                pb.UpdateTaskRequest(task=pb.Task(name=task.name, title=t)), timeout=20
            )
            for t in titles
        )
    )
    assert sorted(r.title for r in results) == sorted(titles)
    assert len({r.etag for r in results}) == len(titles)  # 32 distinct versions
    final = await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
    assert final.title in titles
    assert final.etag == max(results, key=lambda r: r.update_time.ToNanoseconds()).etag


async def test_etag_compare_and_swap_counter_has_exactly_one_winner_per_etag(
    running: Running,
) -> None:
    task = await running.stub.CreateTask(create_request("0"))
    wins: list[str] = []

    async def increment() -> None:
        for _ in range(500):  # each try loses only to another winner: 10 winners in all
            current = await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
            new = pb.Task(name=task.name, title=str(int(current.title) + 1), etag=current.etag)
            try:
                await running.stub.UpdateTask(pb.UpdateTaskRequest(task=new))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED
                continue
            wins.append(current.etag)
            return
        raise AssertionError("500 tries without winning: an etag that never matches?")

    await asyncio.gather(*(increment() for _ in range(10)))
    final = await running.stub.GetTask(pb.GetTaskRequest(name=task.name))
    assert final.title == "10"
    assert len(set(wins)) == 10  # each etag won exactly once


# -- delete -----------------------------------------------------------------


async def test_delete(running: Running) -> None:
    task = await running.stub.CreateTask(create_request("t"))
    updated = await running.stub.UpdateTask(
        pb.UpdateTaskRequest(task=pb.Task(name=task.name, title="u"))
    )
    details = await expect_error(
        running.stub.DeleteTask(pb.DeleteTaskRequest(name=task.name, etag=task.etag)),
        grpc.StatusCode.ABORTED,
    )
    assert details.reason == "ETAG_MISMATCH"
    await running.stub.DeleteTask(pb.DeleteTaskRequest(name=task.name, etag=updated.etag))
    await expect_error(
        running.stub.GetTask(pb.GetTaskRequest(name=task.name)), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        running.stub.DeleteTask(pb.DeleteTaskRequest(name=task.name)), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        running.stub.DeleteTask(pb.DeleteTaskRequest(name=task.name, etag=updated.etag)),
        grpc.StatusCode.NOT_FOUND,
    )
    other = await running.stub.CreateTask(create_request("t2"))
    await running.stub.DeleteTask(pb.DeleteTaskRequest(name=other.name))
    details = await expect_error(
        running.stub.DeleteTask(pb.DeleteTaskRequest(name="tasks/x", etag="nothex")), IA
    )
    assert details.fields == ["etag"]
    await expect_error(running.stub.DeleteTask(pb.DeleteTaskRequest(name="x/y")), IA)


async def test_request_id_of_a_deleted_task(running: Running) -> None:
    request_id = str(uuid.uuid4())
    task = await running.stub.CreateTask(create_request("t", request_id=request_id))
    await running.stub.DeleteTask(pb.DeleteTaskRequest(name=task.name))
    details = await expect_error(
        running.stub.CreateTask(create_request("t", request_id=request_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details.reason == "REQUEST_ID_ALREADY_USED"


# -- batch ------------------------------------------------------------------


async def test_batch_create_in_stream_order(running: Running) -> None:
    requests = [
        create_request(f"task {i}", task_id=f"b-{i:03d}" if i % 2 else "") for i in range(50)
    ]
    response = await running.stub.BatchCreateTasks(stream_of(requests))
    assert [t.title for t in response.tasks] == [f"task {i}" for i in range(50)]
    assert [t.name for t in response.tasks][1] == "tasks/b-001"
    for t in response.tasks:
        assert await running.stub.GetTask(pb.GetTaskRequest(name=t.name)) == t


async def test_batch_is_atomic_on_invalid_item(running: Running) -> None:
    requests = [create_request(f"t{i}") for i in range(10)]
    requests[7].task.title = ""
    details = await expect_error(running.stub.BatchCreateTasks(stream_of(requests)), IA)
    assert details.fields == ["requests[7].task.title"]
    assert list((await running.stub.ListTasks(pb.ListTasksRequest())).tasks) == []


async def test_batch_is_atomic_on_taken_id(running: Running) -> None:
    await running.stub.CreateTask(create_request("exists", task_id="taken"))
    requests = [create_request(f"t{i}", task_id=f"new-{i}") for i in range(5)]
    requests[3].task_id = "taken"
    details = await expect_error(
        running.stub.BatchCreateTasks(stream_of(requests)), grpc.StatusCode.ALREADY_EXISTS
    )
    assert "requests[3].task_id" in details.message
    listed = await running.stub.ListTasks(pb.ListTasksRequest())
    assert [t.name for t in listed.tasks] == ["tasks/taken"]


async def test_batch_duplicates_inside_one_call(running: Running) -> None:
    requests = [create_request("a", task_id="same"), create_request("b", task_id="same")]
    details = await expect_error(running.stub.BatchCreateTasks(stream_of(requests)), IA)
    assert details.fields == ["requests[1].task_id"]
    rid = str(uuid.uuid4())
    requests = [create_request("a", request_id=rid), create_request("b", request_id=rid)]
    details = await expect_error(running.stub.BatchCreateTasks(stream_of(requests)), IA)
    assert details.fields == ["requests[1].request_id"]


async def test_batch_limit_500(running: Running) -> None:
    requests = [create_request(f"t{i}") for i in range(501)]
    details = await expect_error(running.stub.BatchCreateTasks(stream_of(requests)), IA)
    assert details.fields == ["requests"]
    assert list((await running.stub.ListTasks(pb.ListTasksRequest())).tasks) == []
    full = await running.stub.BatchCreateTasks(stream_of(requests[:500]))
    assert len(full.tasks) == 500


async def test_batch_retry_with_request_ids_creates_nothing_new(running: Running) -> None:
    requests = [create_request(f"t{i}", request_id=str(uuid.uuid4())) for i in range(5)]
    first = await running.stub.BatchCreateTasks(stream_of(requests))
    again = await running.stub.BatchCreateTasks(stream_of(requests))
    assert list(again.tasks) == list(first.tasks)
    listed = await running.stub.ListTasks(pb.ListTasksRequest())
    assert len(listed.tasks) == 5


async def test_empty_batch(running: Running) -> None:
    response = await running.stub.BatchCreateTasks(stream_of([]))
    assert list(response.tasks) == []


# -- list -------------------------------------------------------------------


async def _all_pages(running: Running, **kwargs: object) -> list[pb.Task]:
    seen: list[pb.Task] = []
    token = ""
    while True:
        page = await running.stub.ListTasks(pb.ListTasksRequest(page_token=token, **kwargs))  # type: ignore[arg-type]
        seen.extend(page.tasks)
        token = page.next_page_token
        if not token:
            return seen


async def test_paging_returns_every_task_exactly_once_in_order(running: Running) -> None:
    # One batch: many tasks share one create_time, so ties must break on name.
    created = (
        await running.stub.BatchCreateTasks(stream_of([create_request(f"t{i}") for i in range(57)]))
    ).tasks
    created = [*created, await running.stub.CreateTask(create_request("late"))]
    for order_by, key, reverse in [
        ("", lambda t: (t.create_time.ToNanoseconds(), t.name), True),
        ("create_time desc", lambda t: (t.create_time.ToNanoseconds(), t.name), True),
        ("create_time", lambda t: (t.create_time.ToNanoseconds(), t.name), False),
        ("update_time desc", lambda t: (t.update_time.ToNanoseconds(), t.name), True),
        ("  update_time  ", lambda t: (t.update_time.ToNanoseconds(), t.name), False),
    ]:
        for page_size in (1, 7, 58, 0):
            seen = await _all_pages(running, page_size=page_size, order_by=order_by)
            assert [t.name for t in seen] == [
                t.name for t in sorted(created, key=key, reverse=reverse)
            ], (
                order_by,
                page_size,
            )


async def test_page_size_rules(running: Running) -> None:
    await running.stub.BatchCreateTasks(stream_of([create_request(f"t{i}") for i in range(230)]))
    assert len((await running.stub.ListTasks(pb.ListTasksRequest())).tasks) == 50
    big = await running.stub.ListTasks(pb.ListTasksRequest(page_size=1000))
    assert len(big.tasks) == 200 and big.next_page_token
    rest = await running.stub.ListTasks(
        pb.ListTasksRequest(page_size=200, page_token=big.next_page_token)
    )
    assert len(rest.tasks) == 30 and rest.next_page_token == ""
    details = await expect_error(running.stub.ListTasks(pb.ListTasksRequest(page_size=-1)), IA)
    assert details.fields == ["page_size"]


async def test_exact_page_has_no_dangling_token(running: Running) -> None:
    await running.stub.BatchCreateTasks(stream_of([create_request(f"t{i}") for i in range(4)]))
    page = await running.stub.ListTasks(pb.ListTasksRequest(page_size=4))
    assert len(page.tasks) == 4 and page.next_page_token == ""
    empty = await running.stub.ListTasks(pb.ListTasksRequest(filter='assignee = "nobody-here"'))
    assert list(empty.tasks) == [] and empty.next_page_token == ""


async def test_page_tokens_are_checked(running: Running) -> None:
    await running.stub.BatchCreateTasks(stream_of([create_request(f"t{i}") for i in range(5)]))
    page = await running.stub.ListTasks(
        pb.ListTasksRequest(page_size=2, filter="state = STATE_OPEN")
    )
    token = page.next_page_token
    assert token
    # Same query spelled differently, and another page size: accepted.
    await running.stub.ListTasks(
        pb.ListTasksRequest(page_size=3, filter="state=STATE_OPEN", page_token=token)
    )
    for bad in [
        token[:-2],
        token[:5] + ("A" if token[5] != "A" else "B") + token[6:],
        "garbage!!",
        "x" * 600,
    ]:
        details = await expect_error(
            running.stub.ListTasks(
                pb.ListTasksRequest(page_size=2, filter="state = STATE_OPEN", page_token=bad)
            ),
            IA,
        )
        assert details.fields == ["page_token"]
    for other in [
        pb.ListTasksRequest(page_token=token),
        pb.ListTasksRequest(page_token=token, filter="state = STATE_OPEN", order_by="create_time"),
        pb.ListTasksRequest(page_token=token, filter="state = STATE_DONE"),
    ]:
        details = await expect_error(running.stub.ListTasks(other), IA)
        assert details.fields == ["page_token"]


async def test_filters(running: Running) -> None:
    specs = [
        ("a", pb.Task.PRIORITY_HIGH, "ana", ["red", "blue"]),
        ("b", pb.Task.PRIORITY_LOW, "ana", ["red"]),
        ("c", pb.Task.PRIORITY_HIGH, "bob", ["blue"]),
        ("d", pb.Task.PRIORITY_HIGH, "", []),
        ("e", pb.Task.PRIORITY_HIGH, 'q"uote\\', ["with space"]),
    ]
    made = {}
    for title, priority, assignee, tags in specs:
        kwargs = {"priority": priority, "tags": tags}
        if assignee:
            kwargs["assignee"] = assignee
        made[title] = await running.stub.CreateTask(create_request(title, **kwargs))
    await running.stub.UpdateTask(
        pb.UpdateTaskRequest(task=pb.Task(name=made["c"].name, state=pb.Task.STATE_DONE))
    )

    async def titles(flt: str) -> set[str]:
        return {t.title for t in await _all_pages(running, filter=flt, page_size=2)}

    assert await titles("") == {"a", "b", "c", "d", "e"}
    assert await titles("state = STATE_OPEN") == {"a", "b", "d", "e"}
    assert await titles("state = STATE_DONE") == {"c"}
    assert await titles("priority = PRIORITY_HIGH") == {"a", "c", "d", "e"}
    assert await titles('assignee = "ana"') == {"a", "b"}
    assert await titles('assignee = ""') == {"d"}
    assert await titles('assignee = "q\\"uote\\\\"') == {"e"}
    assert await titles('tags:"red"') == {"a", "b"}
    assert await titles('tags : "with space"') == {"e"}
    assert await titles(
        'tags:"red" AND priority = PRIORITY_HIGH AND assignee="ana" AND state=STATE_OPEN'
    ) == {"a"}
    assert await titles('priority = PRIORITY_HIGH AND tags:"blue"') == {"a", "c"}
    for order in ("create_time", "update_time desc"):
        seen = await _all_pages(
            running, filter="priority = PRIORITY_HIGH", order_by=order, page_size=1
        )
        assert len(seen) == 4


@pytest.mark.parametrize(
    "bad",
    [
        'title = "x"',
        "state = OPEN",
        "state = STATE_UNSPECIFIED",
        "state = 1",
        "priority = PRIORITY_NOPE",
        "assignee = ana",
        'tags = "x"',
        "state = STATE_OPEN OR state = STATE_DONE",
        "state = STATE_OPEN AND",
        "state = STATE_OPEN state = STATE_DONE",
        "state = STATE_OPEN AND state = STATE_DONE",
        'tags:"a" AND tags:"b"',
        "NOT state = STATE_OPEN",
        "(state = STATE_OPEN)",
        'assignee = "unterminated',
        "state",
        "create_time > 0",
        '__name__ = "x"',
        "x" * 1100,
    ],
)
async def test_bad_filters_are_rejected_naming_filter(running: Running, bad: str) -> None:
    details = await expect_error(running.stub.ListTasks(pb.ListTasksRequest(filter=bad)), IA)
    assert details.fields == ["filter"]
    assert details.reason == "INVALID_FILTER"


@pytest.mark.parametrize(
    "bad", ["title", "create_time asc desc", "create_time DESC", "name", "update_time desc,name"]
)
async def test_bad_order_by(running: Running, bad: str) -> None:
    details = await expect_error(running.stub.ListTasks(pb.ListTasksRequest(order_by=bad)), IA)
    assert details.fields == ["order_by"]


async def test_an_early_invalid_item_still_answers_invalid_argument(running: Running) -> None:
    """The client is still streaming when the server finds item 0 bad: it must
    get INVALID_ARGUMENT, not a transport error for a stream cut short."""
    for _ in range(5):
        requests = [create_request(f"t{i}", description="d" * 1500) for i in range(499)]
        requests[0].task.title = ""
        details = await expect_error(running.stub.BatchCreateTasks(stream_of(requests)), IA)
        assert details.fields == ["requests[0].task.title"]
    assert list((await running.stub.ListTasks(pb.ListTasksRequest())).tasks) == []


# -- contract text and Unicode (issue 9, item 13) ------------------------------


@pytest.mark.parametrize("title", ["\u200b", "\ufeff", " \u200b\u2060 ", "\u3164", "\u00a0\u200d"])
async def test_a_title_of_only_invisible_characters_is_blank(running: Running, title: str) -> None:
    details = await expect_error(running.stub.CreateTask(create_request(title)), IA)
    assert details.fields == ["task.title"]
    task = await running.stub.CreateTask(create_request("ok"))
    details = await expect_error(
        running.stub.UpdateTask(pb.UpdateTaskRequest(task=pb.Task(name=task.name, title=title))),
        IA,
    )
    assert details.fields == ["task.title"]


async def test_tags_are_nfc_normalized_and_spellings_of_one_tag_are_duplicates(
    running: Running,
) -> None:
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    details = await expect_error(running.stub.CreateTask(create_request("t", tags=[nfc, nfd])), IA)
    assert details.fields == ["task.tags[1]"]
    task = await running.stub.CreateTask(create_request("t", tags=[nfd, "x"]))
    assert list(task.tags) == [nfc, "x"]
    assert list((await running.stub.GetTask(pb.GetTaskRequest(name=task.name))).tags) == [nfc, "x"]
    for spelling in (nfc, nfd):
        listed = await running.stub.ListTasks(pb.ListTasksRequest(filter=f'tags:"{spelling}"'))
        assert [t.name for t in listed.tasks] == [task.name]
    details = await expect_error(running.stub.CreateTask(create_request("t", tags=["\u200b"])), IA)
    assert details.fields == ["task.tags[0]"]


async def test_a_mask_of_only_output_only_paths_says_so(running: Running) -> None:
    task = await running.stub.CreateTask(create_request("t"))
    details = await expect_error(
        running.stub.UpdateTask(
            pb.UpdateTaskRequest(
                task=pb.Task(name=task.name, title="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["name", "etag"]),
            )
        ),
        IA,
    )
    assert details.fields == ["update_mask"]
    assert "output-only" in details.message
