"""Protobuf ↔ domain: the one module that reads tasks.v1 requests and writes
tasks.v1 responses.

parse_*_request turns a request into the domain values the store takes (or
raises InvalidArgument naming the caller's field paths), read_batch does the
same for a BatchCreateTasks stream, and to_proto / list_response turn the
store's results back into messages. The rules for each value live in
validation.py; this module only says where in a message each value is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from tasks.v1 import task_service_pb2 as pb

from taskservice.api.watching import decode_resume_token, filter_fingerprint
from taskservice.domain import validation
from taskservice.domain.changes import WatchEvent, WatchQuery
from taskservice.domain.errors import InvalidArgument, Violation
from taskservice.domain.filtering import parse_filter
from taskservice.domain.limits import MAX_BATCH
from taskservice.domain.model import (
    Cursor,
    ListQuery,
    ListResult,
    NewTask,
    Ordering,
    State,
    Task,
    TaskContent,
    TaskPatch,
    sort_time,
)
from taskservice.domain.sizes import check_batch_response_size
from taskservice.domain.tokens import decode_token, encode_token, fingerprint


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    task_id: str
    patch: TaskPatch
    expected_version: int | None  # from task.etag


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    task_id: str
    expected_version: int | None  # from etag


@dataclass(frozen=True, slots=True)
class ListRequest:
    query: ListQuery
    query_fingerprint: bytes  # for the next page token


def to_proto(task: Task) -> pb.Task:
    c = task.content
    message = pb.Task(
        name="tasks/" + task.task_id,
        title=c.title,
        description=c.description,
        priority=pb.Task.Priority.ValueType(c.priority),
        state=pb.Task.State.ValueType(c.state),
        tags=c.tags,
        etag=task.etag,
    )
    message.create_time.FromNanoseconds(task.create_time_ns)
    message.update_time.FromNanoseconds(task.update_time_ns)
    if c.assignee:
        message.assignee = c.assignee
    return message


def parse_create_request(request: pb.CreateTaskRequest) -> NewTask:
    """A CreateTaskRequest (also one item of a batch) as a NewTask. Output-only
    fields and task.state are ignored: every new task is STATE_OPEN."""
    if not request.HasField("task"):
        raise InvalidArgument([("task", "is required")])
    task = request.task
    out: list[Violation] = []
    validation.check_title(task.title, "task.title", out)
    validation.check_description(task.description, "task.description", out)
    priority = validation.priority(task.priority, "task.priority", out)
    validation.check_assignee(task.assignee, "task.assignee", out)
    tags = validation.tags(task.tags, "task.tags", out)
    if request.task_id:
        validation.check_task_id(request.task_id, "task_id", out)
    request_id = validation.request_id(request.request_id, "request_id", out)
    if out:
        raise InvalidArgument(out)
    return NewTask(
        task_id=request.task_id or validation.new_task_id(),
        content=TaskContent(
            title=task.title,
            description=task.description,
            priority=priority,
            state=State.OPEN,
            assignee=task.assignee,
            tags=tags,
        ),
        request_id=request_id,
    )


def parse_get_request(request: pb.GetTaskRequest) -> str:
    return validation.task_id_from_name(request.name, "name")


def parse_update_request(request: pb.UpdateTaskRequest) -> UpdateRequest:
    """The fields in update_mask (without a mask, or with an empty one: the
    populated fields, as AIP-134 says), checked."""
    if not request.HasField("task"):
        raise InvalidArgument([("task", "is required")])
    task = request.task
    task_id = validation.task_id_from_name(task.name, "task.name")
    if request.update_mask.paths:
        fields = validation.mask_fields(request.update_mask.paths)
    else:
        fields = frozenset(
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
        )
        if not fields:
            raise InvalidArgument([("update_mask", "names no field to update")])
    out: list[Violation] = []
    version = validation.etag(task.etag, "task.etag", out)
    patch = TaskPatch(
        title=task.title if "title" in fields else None,
        description=task.description if "description" in fields else None,
        priority=validation.priority(task.priority, "task.priority", out)
        if "priority" in fields
        else None,
        state=validation.state(task.state, "task.state", out) if "state" in fields else None,
        assignee=task.assignee if "assignee" in fields else None,
        tags=validation.tags(task.tags, "task.tags", out) if "tags" in fields else None,
    )
    if patch.title is not None:
        validation.check_title(patch.title, "task.title", out)
    if patch.description is not None:
        validation.check_description(patch.description, "task.description", out)
    if patch.assignee is not None:
        validation.check_assignee(patch.assignee, "task.assignee", out)
    if out:
        raise InvalidArgument(out)
    return UpdateRequest(task_id, patch, version)


def parse_delete_request(request: pb.DeleteTaskRequest) -> DeleteRequest:
    task_id = validation.task_id_from_name(request.name, "name")
    out: list[Violation] = []
    version = validation.etag(request.etag, "etag", out)
    if out:
        raise InvalidArgument(out)
    return DeleteRequest(task_id, version)


def parse_list_request(request: pb.ListTasksRequest) -> ListRequest:
    limit = validation.page_size(request.page_size)
    task_filter = parse_filter(request.filter)
    ordering = validation.ordering(request.order_by)
    query_fp = fingerprint(task_filter, ordering)
    after: Cursor | None = None
    if request.page_token:
        after = decode_token(request.page_token, query_fp)
    return ListRequest(
        ListQuery(filter=task_filter, ordering=ordering, limit=limit, after=after), query_fp
    )


def list_response(result: ListResult, request: ListRequest) -> pb.ListTasksResponse:
    next_token = ""
    if result.has_more and result.tasks:
        last = result.tasks[-1]
        ordering: Ordering = request.query.ordering
        next_token = encode_token(
            Cursor(sort_time(last, ordering), last.task_id), request.query_fingerprint
        )
    return pb.ListTasksResponse(
        tasks=[to_proto(t) for t in result.tasks], next_page_token=next_token
    )


async def read_batch(messages: AsyncIterator[pb.CreateTaskRequest]) -> list[NewTask]:
    """A BatchCreateTasks stream as NewTasks, naming requests[i] in errors:
    at most MAX_BATCH items, no task_id or request_id twice, and a response
    that a default client can receive (sizes.check_batch_response_size)."""
    items: list[NewTask] = []
    task_ids: dict[str, int] = {}
    request_ids: dict[str, int] = {}
    async for request in messages:
        index = len(items)
        if index >= MAX_BATCH:
            raise InvalidArgument(
                [("requests", f"at most {MAX_BATCH} tasks per call; nothing was written")],
                reason="BATCH_TOO_LARGE",
                metadata={"max_tasks": str(MAX_BATCH)},
            )
        try:
            item = parse_create_request(request)
        except InvalidArgument as err:
            raise err.prefixed(f"requests[{index}]") from None
        if request.task_id and item.task_id in task_ids:
            raise InvalidArgument(
                [(f"requests[{index}].task_id", f"repeats requests[{task_ids[item.task_id]}]")]
            )
        if item.request_id is not None and item.request_id in request_ids:
            first = request_ids[item.request_id]
            raise InvalidArgument([(f"requests[{index}].request_id", f"repeats requests[{first}]")])
        task_ids[item.task_id] = index
        if item.request_id is not None:
            request_ids[item.request_id] = index
        items.append(item)
    check_batch_response_size((item.task_id, item.content) for item in items)
    return items


def parse_watch_request(request: pb.WatchTasksRequest, progress_seconds: float) -> WatchQuery:
    task_filter = parse_filter(request.filter)
    after = None
    if request.resume_token:
        after = decode_resume_token(request.resume_token, filter_fingerprint(task_filter))
    return WatchQuery(
        filter=task_filter,
        after=after,
        include_initial=request.include_initial and after is None,
        progress_seconds=progress_seconds,
    )


def watch_response(event: WatchEvent, resume_token: str) -> pb.WatchTasksResponse:
    message = pb.WatchTasksResponse(
        type=pb.WatchTasksResponse.Type.ValueType(event.type), resume_token=resume_token
    )
    if event.task_id:
        message.name = "tasks/" + event.task_id
    if event.task is not None:
        message.task.CopyFrom(to_proto(event.task))
    if event.reason is not None:
        message.removal_reason = pb.WatchTasksResponse.RemovalReason.ValueType(event.reason)
    message.commit_time.FromNanoseconds(event.commit_time_ns)
    return message
