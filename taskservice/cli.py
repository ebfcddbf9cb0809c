"""taskctl: TaskService from the command line, for people and scripts.

    taskctl create "Write the runbook" --priority high --tag ops
    taskctl list --filter 'state = STATE_OPEN' --all
    taskctl update runbook --state done --etag 18ec...
    taskctl import tasks.jsonl      # BatchCreateTasks in chunks of 500
    taskctl export > tasks.jsonl    # every task, one JSON object per line

The target comes from --target or TASKCTL_TARGET (default localhost:8080);
a *.run.app target gets TLS and a Google ID token (see taskservice.client).
Output is a table unless --json. Exit status: 0 ok, 1 a call failed, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import grpc
from google.protobuf import field_mask_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from tasks.v1 import task_service_pb2 as pb

from taskservice.client import bearer_token_credentials, connect

CHUNK = 500
_IMPORT_NAMESPACE = uuid.UUID("6f1d7f7e-7c47-4a53-9b5e-2b8f3c1d9a10")
_PRIORITIES = {
    name.removeprefix("PRIORITY_").lower(): value
    for name, value in pb.Task.Priority.items()
    if value
}
_STATES = {
    name.removeprefix("STATE_").lower(): value for name, value in pb.Task.State.items() if value
}


class CliError(Exception):
    pass


def _name(task: str) -> str:
    return task if task.startswith("tasks/") else f"tasks/{task}"


def _to_dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def _cell(value: str, width: int) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= width else value[: width - 1] + "…"


def print_table(tasks: Sequence[pb.Task], out: TextIO) -> None:
    rows = [("NAME", "TITLE", "STATE", "PRIORITY", "ASSIGNEE", "TAGS", "UPDATED")]
    for t in tasks:
        rows.append(
            (
                t.name.removeprefix("tasks/"),
                _cell(t.title, 40),
                pb.Task.State.Name(t.state).removeprefix("STATE_"),
                pb.Task.Priority.Name(t.priority).removeprefix("PRIORITY_"),
                _cell(t.assignee, 24),
                _cell(",".join(t.tags), 24),
                t.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def describe_error(err: grpc.aio.AioRpcError) -> str:
    text = f"{err.code().name}: {err.details()}"
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    fields = ", ".join(v.field for v in bad.field_violations)
                    text += f" [fields: {fields}]"
    return text


@dataclass
class Output:
    as_json: bool
    out: TextIO

    def tasks(self, tasks: Sequence[pb.Task]) -> None:
        if self.as_json:
            for t in tasks:
                self.out.write(json.dumps(_to_dict(t), ensure_ascii=False) + "\n")
        else:
            print_table(tasks, self.out)


# -- import -----------------------------------------------------------------


@dataclass
class ImportReport:
    created: int = 0
    failed_lines: int = 0
    errors: list[str] | None = None


def parse_line(text: str, line_number: int, file_key: str) -> pb.CreateTaskRequest:
    """One JSONL line: a CreateTaskRequest ({"task": {...}, "task_id": ...}) or a
    bare Task ({"title": ...}). Without a request_id, one is derived from the
    file's path, the line number and the line's text, so importing the same
    file again (say, after fixing its bad lines) creates nothing twice."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if "task" not in data:
        data = {"task": data}
    request = json_format.ParseDict(data, pb.CreateTaskRequest())
    if not request.request_id:
        line_digest = hashlib.sha256(text.encode()).hexdigest()
        key = f"{file_key}:{line_number}:{line_digest}"
        request.request_id = str(uuid.uuid5(_IMPORT_NAMESPACE, key))
    return request


async def _requests(items: Iterable[pb.CreateTaskRequest]) -> AsyncIterator[pb.CreateTaskRequest]:
    for item in items:
        yield item


def _progress(done: int, total: int, stream: TextIO) -> None:
    if not stream.isatty():
        return
    width = 30
    filled = width * done // max(total, 1)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} lines")
    stream.flush()


async def import_file(
    stub: Any, path: str, output: Output, errors: TextIO, chunk_size: int = CHUNK
) -> ImportReport:
    with open(path, "rb") as f:
        raw = f.read()
    file_key = os.path.realpath(path)
    lines = [
        (n, line) for n, line in enumerate(raw.decode("utf-8").splitlines(), 1) if line.strip()
    ]
    report = ImportReport(errors=[])
    assert report.errors is not None
    done = 0
    for start in range(0, len(lines), chunk_size):
        chunk = lines[start : start + chunk_size]
        requests: list[pb.CreateTaskRequest] = []
        bad: list[str] = []
        for number, text in chunk:
            try:
                requests.append(parse_line(text, number, file_key))
            except (ValueError, json_format.ParseError) as exc:
                bad.append(f"line {number}: {exc}")
        if not bad:
            try:
                response = await stub.BatchCreateTasks(_requests(requests))
            except grpc.aio.AioRpcError as err:
                bad.append(f"lines {chunk[0][0]}-{chunk[-1][0]}: {_line_error(err, chunk)}")
            else:
                report.created += len(response.tasks)
                if output.as_json:
                    output.tasks(response.tasks)
        if bad:
            report.failed_lines += len(chunk)
            report.errors.extend(bad)
            report.errors.append(f"nothing from lines {chunk[0][0]}-{chunk[-1][0]} was written")
        done += len(chunk)
        _progress(done, len(lines), errors)
    if errors.isatty() and lines:
        errors.write("\n")
    return report


def _line_error(err: grpc.aio.AioRpcError, chunk: Sequence[tuple[int, str]]) -> str:
    """The server's error, with requests[i] turned into the file's line numbers."""
    import re

    def line_of(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return f"line {chunk[index][0]}" if index < len(chunk) else match.group(0)

    return re.sub(r"requests\[(\d+)\]", line_of, describe_error(err))


# -- commands ---------------------------------------------------------------


async def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    output = Output(args.json, out)
    credentials = bearer_token_credentials(args.id_token) if args.id_token else None
    async with connect(args.target, call_credentials=credentials) as client:
        stub = client.stub
        timeout = args.timeout
        if args.command == "create":
            task = pb.Task(title=args.title, description=args.description or "", tags=args.tag)
            if args.priority:
                task.priority = _PRIORITIES[args.priority]
            if args.assignee is not None:
                task.assignee = args.assignee
            request = pb.CreateTaskRequest(
                task=task, task_id=args.id or "", request_id=args.request_id or str(uuid.uuid4())
            )
            output.tasks([await stub.CreateTask(request, timeout=timeout)])
        elif args.command == "get":
            output.tasks(
                [await stub.GetTask(pb.GetTaskRequest(name=_name(args.task)), timeout=timeout)]
            )
        elif args.command == "list":
            await _list(stub, args, output, timeout)
        elif args.command == "update":
            await _update(stub, args, output, timeout)
        elif args.command == "delete":
            await stub.DeleteTask(
                pb.DeleteTaskRequest(name=_name(args.task), etag=args.etag or ""), timeout=timeout
            )
            if not args.json:
                out.write(f"deleted {_name(args.task)}\n")
        elif args.command == "import":
            report = await import_file(stub, args.file, output, err, args.chunk_size)
            for line in report.errors or ():
                err.write(f"taskctl: {line}\n")
            err.write(f"imported {report.created} tasks; {report.failed_lines} lines not written\n")
            return 1 if report.failed_lines else 0
        elif args.command == "export":
            await _export(stub, args, out, timeout)
    return 0


async def _pages(
    stub: Any, args: argparse.Namespace, page_size: int, timeout: float
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


async def _list(stub: Any, args: argparse.Namespace, output: Output, timeout: float) -> None:
    if args.page_token or not args.all:
        page = await stub.ListTasks(
            pb.ListTasksRequest(
                filter=args.filter or "",
                order_by=args.order_by or "",
                page_size=args.page_size,
                page_token=args.page_token or "",
            ),
            timeout=timeout,
        )
        output.tasks(page.tasks)
        if page.next_page_token and not args.json:
            output.out.write(f"next page: --page-token {page.next_page_token}\n")
        return
    tasks: list[pb.Task] = []
    async for page in _pages(stub, args, args.page_size or 200, timeout):
        tasks.extend(page.tasks)
    output.tasks(tasks)


async def _export(stub: Any, args: argparse.Namespace, out: TextIO, timeout: float) -> None:
    async for page in _pages(stub, args, 200, timeout):
        for task in page.tasks:
            out.write(json.dumps(_to_dict(task), ensure_ascii=False) + "\n")


async def _update(stub: Any, args: argparse.Namespace, output: Output, timeout: float) -> None:
    task = pb.Task(name=_name(args.task), etag=args.etag or "")
    paths: list[str] = []
    if args.title is not None:
        task.title = args.title
        paths.append("title")
    if args.description is not None:
        task.description = args.description
        paths.append("description")
    if args.priority is not None:
        task.priority = _PRIORITIES[args.priority]
        paths.append("priority")
    if args.state is not None:
        task.state = _STATES[args.state]
        paths.append("state")
    if args.assignee is not None:
        task.assignee = args.assignee
        paths.append("assignee")
    if args.tag is not None or args.clear_tags:
        task.tags.extend(args.tag or [])
        paths.append("tags")
    if not paths:
        raise CliError("nothing to update: give --title, --state, --tag, ...")
    request = pb.UpdateTaskRequest(task=task, update_mask=field_mask_pb2.FieldMask(paths=paths))
    output.tasks([await stub.UpdateTask(request, timeout=timeout)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskctl", description="Talk to a TaskService.")
    parser.add_argument(
        "--target",
        default=os.environ.get("TASKCTL_TARGET", "localhost:8080"),
        help="host:port or https URL (env TASKCTL_TARGET; default localhost:8080)",
    )
    parser.add_argument(
        "--id-token",
        default=os.environ.get("TASKCTL_ID_TOKEN"),
        help="bearer ID token for a TLS target (env TASKCTL_ID_TOKEN); default: fetched",
    )
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    sub = parser.add_subparsers(dest="command", required=True)

    create = sub.add_parser("create", help="create a task")
    create.add_argument("title")
    create.add_argument("--description")
    create.add_argument("--priority", choices=sorted(_PRIORITIES))
    create.add_argument("--assignee")
    create.add_argument("--tag", action="append", default=[])
    create.add_argument("--id", help="task id (default: the server picks one)")
    create.add_argument("--request-id", help="UUID making the create idempotent (default: new)")

    get = sub.add_parser("get", help="show a task")
    get.add_argument("task", help="task id or tasks/{id}")

    lst = sub.add_parser("list", help="list tasks")
    lst.add_argument("--filter", help='e.g. state = STATE_OPEN AND tags:"ops"')
    lst.add_argument("--order-by", help='"create_time desc" (default), "update_time", ...')
    lst.add_argument("--page-size", type=int, default=0)
    lst.add_argument("--page-token")
    lst.add_argument("--all", action="store_true", help="every page")

    update = sub.add_parser("update", help="change fields of a task")
    update.add_argument("task")
    update.add_argument("--title")
    update.add_argument("--description")
    update.add_argument("--priority", choices=sorted(_PRIORITIES))
    update.add_argument("--state", choices=sorted(_STATES))
    update.add_argument("--assignee", help='"" clears it')
    update.add_argument("--tag", action="append", help="replaces all tags (repeat)")
    update.add_argument("--clear-tags", action="store_true")
    update.add_argument("--etag", help="fail with ABORTED unless this is the current etag")

    delete = sub.add_parser("delete", help="delete a task")
    delete.add_argument("task")
    delete.add_argument("--etag")

    imp = sub.add_parser("import", help="create tasks from a JSONL file, in atomic chunks")
    imp.add_argument("file")
    imp.add_argument(
        "--chunk-size", type=int, default=CHUNK, choices=range(1, CHUNK + 1), metavar="N"
    )

    exp = sub.add_parser("export", help="write every task as JSON lines")
    exp.add_argument("--filter")
    exp.add_argument("--order-by")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args, sys.stdout, sys.stderr))
    except grpc.aio.AioRpcError as err:
        print(f"taskctl: {describe_error(err)}", file=sys.stderr)
        return 1
    except (CliError, OSError, ValueError) as err:
        print(f"taskctl: {err}", file=sys.stderr)
        return 2 if isinstance(err, CliError) else 1


if __name__ == "__main__":
    sys.exit(main())
