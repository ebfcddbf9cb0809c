"""taskctl's subcommands, each an async function of (client, args, output,
out, err) returning the exit status; build_parser binds each to its
subparser with set_defaults(func=...)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TextIO

import grpc
from google.protobuf import field_mask_pb2
from tasks.v1 import task_service_pb2 as pb

from taskservice.cli._import import import_file
from taskservice.cli._output import (
    DEFAULT_TARGET,
    PRIORITIES,
    STATES,
    CliError,
    Output,
    cell,
    task_name,
    to_dict,
)
from taskservice.client import (
    TaskClient,
)

if TYPE_CHECKING:
    # Only in the generated stubs: what TaskServiceStub(channel) is on a grpc.aio channel.
    from tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub


async def create(
    client: TaskClient, args: argparse.Namespace, output: Output, out: TextIO, err: TextIO
) -> int:
    task = pb.Task(title=args.title, description=args.description or "", tags=args.tag)
    if args.priority:
        task.priority = PRIORITIES[args.priority]
    if args.assignee is not None:
        task.assignee = args.assignee
    request = pb.CreateTaskRequest(
        task=task, task_id=args.id or "", request_id=args.request_id or str(uuid.uuid4())
    )
    output.tasks([await client.stub.CreateTask(request, timeout=args.timeout)])
    return 0


async def get(
    client: TaskClient, args: argparse.Namespace, output: Output, out: TextIO, err: TextIO
) -> int:
    request = pb.GetTaskRequest(name=task_name(args.task))
    output.tasks([await client.stub.GetTask(request, timeout=args.timeout)])
    return 0


async def delete(
    client: TaskClient, args: argparse.Namespace, output: Output, out: TextIO, err: TextIO
) -> int:
    await client.stub.DeleteTask(
        pb.DeleteTaskRequest(name=task_name(args.task), etag=args.etag or ""),
        timeout=args.timeout,
    )
    if not args.json:
        out.write(f"deleted {task_name(args.task)}\n")
    return 0


async def import_tasks(
    client: TaskClient, args: argparse.Namespace, output: Output, out: TextIO, err: TextIO
) -> int:
    report = await import_file(client.stub, args.file, output, err, args.timeout, args.chunk_size)
    for line, problem in sorted(report.failures):
        err.write(f"taskctl: line {line}: {problem}\n")
    summary = f"created {report.created}, already present {report.present}"
    if report.restored:
        summary += f" ({report.restored} of them given their exported state)"
    summary += f", failed {len(report.failures)}"
    if report.failures:
        shown = ", ".join(str(line) for line, _ in sorted(report.failures)[:20])
        more = " …" if len(report.failures) > 20 else ""
        summary += f" (lines {shown}{more})"
    err.write(summary + "\n")
    return 1 if report.failures else 0


def _event_line(event: pb.WatchTasksResponse) -> str:
    kind = pb.WatchTasksResponse.Type.Name(event.type).removeprefix("TYPE_")
    when = event.commit_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if event.type in (pb.WatchTasksResponse.TYPE_CURRENT, pb.WatchTasksResponse.TYPE_PROGRESS):
        return f"{when}  {kind}"
    line = f"{when}  {kind:<8}  {event.name.removeprefix('tasks/')}"
    if event.type == pb.WatchTasksResponse.TYPE_REMOVED:
        reason = pb.WatchTasksResponse.RemovalReason.Name(event.removal_reason)
        line += f"  ({reason.removeprefix('REMOVAL_REASON_').lower().replace('_', ' ')})"
    if event.HasField("task"):
        t = event.task
        state = pb.Task.State.Name(t.state).removeprefix("STATE_")
        line += f"  {state}  {cell(t.title, 50)}"
    return line


def continue_command(args: argparse.Namespace, token: str) -> str:
    """The taskctl command that continues this watch after `token`: the same
    target (when not the default), filter and output flags. Never the ID
    token: that stays in the environment or is fetched again."""
    words = ["taskctl"]
    if args.target != os.environ.get("TASKCTL_TARGET", DEFAULT_TARGET):
        words += ["--target", args.target]
    words.append("watch")
    if args.filter:
        words += ["--filter", args.filter]
    if args.json:
        words.append("--json")
    if args.progress:
        words.append("--progress")
    words += ["--resume-token", token]
    return shlex.join(words)


async def watch(
    client: TaskClient, args: argparse.Namespace, output: Output, out: TextIO, err: TextIO
) -> int:
    """Prints events as they come, until Ctrl-C, SIGTERM or --max-events;
    then, on stderr, the command that continues after the last event. A
    watch that fails (a bad filter or token) prints only its error."""
    token = args.resume_token or ""
    seen = 0
    status = 0
    stop = asyncio.current_task()
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        if stop is not None:
            stop.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        async for event in client.watch(
            args.filter or "", include_initial=args.initial, resume_token=token
        ):
            token = event.resume_token
            if event.type == pb.WatchTasksResponse.TYPE_PROGRESS and not args.progress:
                continue
            if args.json:
                out.write(json.dumps(to_dict(event), ensure_ascii=False) + "\n")
            else:
                out.write(_event_line(event) + "\n")
            out.flush()
            seen += 1
            if args.max_events and seen >= args.max_events:
                break
    except (KeyboardInterrupt, asyncio.CancelledError):
        if terminated:
            status = 128 + signal.SIGTERM
            if stop is not None:
                stop.uncancel()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    if token:
        err.write(f"taskctl: to continue: {continue_command(args, token)}\n")
    return status


async def _pages(
    stub: TaskServiceAsyncStub, args: argparse.Namespace, page_size: int, timeout: float
) -> AsyncIterator[pb.ListTasksResponse]:
    token = ""
    while True:
        page = await stub.ListTasks(
            pb.ListTasksRequest(
                filter=args.filter or "",
                order_by=args.order_by or "",
                page_size=page_size,
                page_token=token,
            ),
            timeout=timeout,
        )
        yield page
        token = page.next_page_token
        if not token:
            return


async def list_tasks(
    client: TaskClient, args: argparse.Namespace, output: Output, out: TextIO, err: TextIO
) -> int:
    stub, timeout = client.stub, args.timeout
    if args.all:
        page = pb.ListTasksResponse()
        async for each in _pages(stub, args, args.page_size or 200, timeout):
            page.tasks.extend(each.tasks)
    else:
        page = await stub.ListTasks(
            pb.ListTasksRequest(
                filter=args.filter or "",
                order_by=args.order_by or "",
                page_size=args.page_size,
                page_token=args.page_token or "",
            ),
            timeout=timeout,
        )
    if output.as_json and output.field is None:
        output.message(page)  # {"tasks": [...], "next_page_token": "..."}, as the API has it
        return 0
    output.tasks(page.tasks)
    if page.next_page_token and output.field is None:
        output.out.write(f"next page: --page-token {page.next_page_token}\n")
    return 0


async def export(
    client: TaskClient, args: argparse.Namespace, output: Output, out: TextIO, err: TextIO
) -> int:
    async for page in _pages(client.stub, args, 200, args.timeout):
        for task in page.tasks:
            out.write(json.dumps(to_dict(task), ensure_ascii=False) + "\n")
    return 0


async def update(
    client: TaskClient, args: argparse.Namespace, output: Output, out: TextIO, err: TextIO
) -> int:
    stub, timeout = client.stub, args.timeout
    name = task_name(args.task)
    task = pb.Task(name=name, etag=args.etag or "")
    paths: list[str] = []
    if args.title is not None:
        task.title = args.title
        paths.append("title")
    if args.description is not None:
        task.description = args.description
        paths.append("description")
    if args.priority is not None:
        task.priority = PRIORITIES[args.priority]
        paths.append("priority")
    if args.state is not None:
        task.state = STATES[args.state]
        paths.append("state")
    if args.assignee is not None:
        task.assignee = args.assignee
        paths.append("assignee")
    if args.tag is not None or args.clear_tags:
        task.tags.extend(args.tag or [])
        paths.append("tags")
    if not paths:
        raise CliError("nothing to update: give --title, --state, --tag, ...")
    if args.if_unchanged:
        if args.etag:
            raise CliError("give --etag or --if-unchanged, not both")
        current = await stub.GetTask(pb.GetTaskRequest(name=name), timeout=timeout)
        task.etag = current.etag
    request = pb.UpdateTaskRequest(task=task, update_mask=field_mask_pb2.FieldMask(paths=paths))
    try:
        output.tasks([await stub.UpdateTask(request, timeout=timeout)])
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.ABORTED or not task.etag:
            raise
        err.write(
            f"taskctl: ABORTED: {name} was changed by someone else since its etag {task.etag}"
            " was read;"
            " nothing was changed. Look at it again (taskctl get) and re-run the update.\n"
        )
        return 1
    return 0
