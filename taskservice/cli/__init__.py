"""taskctl: TaskService from the command line, for people and scripts.

    taskctl create "Write the runbook" --priority high --tag ops --id runbook
    taskctl list --filter 'state = STATE_OPEN' --all
    taskctl update runbook --state done --if-unchanged
    taskctl get runbook --field etag
    taskctl export > tasks.jsonl    # every task, one JSON object per line
    taskctl import tasks.jsonl      # restores an export exactly; safe to re-run
    taskctl export | taskctl --target other:8080 import -   # a move between stores
    taskctl watch --filter 'assignee = "ana"' --initial   # live, until Ctrl-C

The target comes from --target or TASKCTL_TARGET (default localhost:8080); a
*.run.app target gets TLS and a Google ID token (see taskservice.client).
Global flags (--target, --json, --timeout, --id-token) go before or after the
subcommand. Output is a table unless --json (JSON in the API's own shapes) or
--field NAME (that field of each task, one per line). Exit status: 0 ok, 1 a
call failed, 2 usage; a closed pipe (`| head`) ends quietly.

Import restores what export wrote: every line becomes a task with a known id
(its name; for a line without one, an id derived from the file (or
stdin), the line number and the text), so a task that already exists is left alone and counted
as already present. New tasks start STATE_OPEN, as the API says; their
exported state is then set with an update. Running an import again, finished
or interrupted, creates nothing twice and finishes what was left.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

# gRPC core reads its log level once, when it loads: keep its INFO lines out
# of taskctl's output (a TLS handshake failure logs one per connection
# attempt); every failure reaches the user as one line of taskctl's own.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from google.protobuf import field_mask_pb2, json_format
from tasks.v1 import task_service_pb2 as pb

from taskservice.client import (
    TaskClient,
    Unreachable,
    bearer_token_credentials,
    connect,
    error_details,
)

CHUNK = 500
DEFAULT_TARGET = "localhost:8080"
LOOKUPS_IN_FLIGHT = 32
_IMPORT_NAMESPACE = uuid.UUID("6f1d7f7e-7c47-4a53-9b5e-2b8f3c1d9a10")
_PRIORITIES = {
    name.removeprefix("PRIORITY_").lower(): value
    for name, value in pb.Task.Priority.items()
    if value
}
_STATES = {
    name.removeprefix("STATE_").lower(): value for name, value in pb.Task.State.items() if value
}


def _enum_flag(values: Mapping[str, int], prefix: str, what: str, example: str) -> Any:
    """An argparse type that takes every unambiguous spelling of an enum value
    (done, DONE, STATE_DONE, in-progress) and gives its short name."""

    def parse(text: str) -> str:
        key = text.strip().lower().replace("-", "_").removeprefix(prefix.lower())
        if key in values:
            return key
        names = ", ".join(sorted(values, key=values.__getitem__))
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a {what}: give one of {names}"
            f" (any case, or with the prefix, as in {prefix}{example.upper()})"
        )

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_PRIORITY_FLAG = _enum_flag(_PRIORITIES, "PRIORITY_", "priority", "high")
_STATE_FLAG = _enum_flag(_STATES, "STATE_", "state", "done")
FIELDS = ("name", "title", "description", "priority", "state", "assignee", "tags", "etag")
_MUTABLE = ("title", "description", "priority", "assignee", "tags")


class CliError(Exception):
    pass


def task_name(task: str) -> str:
    """tasks/{id} for an id or a name."""
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
    rows = [("NAME", "TITLE", "STATE", "PRIORITY", "ASSIGNEE", "TAGS", "ETAG", "UPDATED")]
    for t in tasks:
        rows.append(
            (
                t.name.removeprefix("tasks/"),
                _cell(t.title, 40),
                pb.Task.State.Name(t.state).removeprefix("STATE_"),
                pb.Task.Priority.Name(t.priority).removeprefix("PRIORITY_"),
                _cell(t.assignee, 24),
                _cell(",".join(t.tags), 24),
                t.etag,
                t.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def describe_error(err: grpc.aio.AioRpcError) -> str:
    """CODE: message [fields: ...], from the google.rpc.Status the call carries."""
    text = f"{err.code().name}: {err.details()}"
    fields = error_details(err).fields
    return text + f" [fields: {', '.join(fields)}]" if fields else text


def _violated_index(err: grpc.aio.AioRpcError) -> int | None:
    """The i of requests[i] in the first field an INVALID_ARGUMENT names."""
    for name in error_details(err).fields:
        found = re.match(r"requests\[(\d+)\]", name)
        if found:
            return int(found.group(1))
    return None


@dataclass
class Output:
    as_json: bool
    out: TextIO
    field: str | None = None

    def tasks(self, tasks: Sequence[pb.Task]) -> None:
        if self.field is not None:
            for t in tasks:
                value = _to_dict(t).get(self.field, "")
                self.out.write((",".join(value) if isinstance(value, list) else str(value)) + "\n")
        elif self.as_json:
            for t in tasks:
                self.out.write(json.dumps(_to_dict(t), ensure_ascii=False) + "\n")
        else:
            print_table(tasks, self.out)

    def message(self, message: Any) -> None:
        self.out.write(json.dumps(_to_dict(message), ensure_ascii=False) + "\n")


# -- import -----------------------------------------------------------------


@dataclass
class ImportItem:
    """One line of an import file: the create to send, and the state to restore."""

    line: int
    request: pb.CreateTaskRequest
    state: int  # the exported state (STATE_OPEN when the line has none)

    @property
    def name(self) -> str:
        return f"tasks/{self.request.task_id}"


@dataclass
class ImportReport:
    created: int = 0
    present: int = 0
    restored: int = 0  # states set on tasks an earlier, interrupted run created
    failures: list[tuple[int, str]] = field(default_factory=list)  # (line, error)


def parse_line(text: str, line_number: int, file_key: str) -> ImportItem:
    """One JSONL line: an exported Task ({"name": "tasks/x", "title": ...}), a
    bare Task without a name, or a CreateTaskRequest ({"task": {...},
    "task_id": ...}). Output-only fields are ignored. A line without an id
    gets one derived from the file, the line number and the text."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if "task" not in data:
        data = {"task": data}
    request = json_format.ParseDict(data, pb.CreateTaskRequest())
    digest = hashlib.sha256(text.encode()).hexdigest()
    if not request.task_id:
        if request.task.name:
            request.task_id = request.task.name.removeprefix("tasks/")
        else:
            request.task_id = str(
                uuid.uuid5(_IMPORT_NAMESPACE, f"{file_key}:{line_number}:{digest}")
            )
    if not request.request_id:
        request.request_id = str(uuid.uuid5(_IMPORT_NAMESPACE, f"{request.task_id}:{digest}"))
    state = request.task.state or pb.Task.STATE_OPEN
    for output_only in ("name", "etag", "create_time", "update_time", "state"):
        request.task.ClearField(output_only)
    return ImportItem(line_number, request, state)


def _same_content(task: pb.Task, wanted: pb.Task) -> bool:
    return all(getattr(task, f) == getattr(wanted, f) for f in _MUTABLE)


async def _stream(items: Iterable[pb.CreateTaskRequest]) -> AsyncIterator[pb.CreateTaskRequest]:
    for item in items:
        yield item


def _progress(done: int, total: int, stream: TextIO) -> None:
    if not stream.isatty():
        return
    width = 30
    filled = width * done // max(total, 1)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} lines")
    stream.flush()


class Importer:
    """Creates what is missing, chunk by chunk, and restores exported states."""

    def __init__(self, stub: Any, timeout: float, output: Output) -> None:
        self.stub = stub
        self.timeout = timeout
        self.output = output
        self.report = ImportReport()
        self._lookups = asyncio.Semaphore(LOOKUPS_IN_FLIGHT)

    async def _existing(self, item: ImportItem) -> pb.Task | None:
        async with self._lookups:
            try:
                task: pb.Task = await self.stub.GetTask(
                    pb.GetTaskRequest(name=item.name), timeout=self.timeout
                )
                return task
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise

    async def chunk(self, items: list[ImportItem]) -> None:
        found = await asyncio.gather(*(self._existing(i) for i in items), return_exceptions=True)
        missing: list[ImportItem] = []
        restore: list[tuple[ImportItem, pb.Task]] = []
        for item, existing in zip(items, found, strict=True):
            if isinstance(existing, grpc.aio.AioRpcError):
                self.report.failures.append((item.line, describe_error(existing)))
            elif isinstance(existing, BaseException):
                raise existing
            elif existing is None:
                missing.append(item)
            else:
                self.report.present += 1
                # Created by an earlier run that stopped before restoring its
                # state: the content is the line's, never updated since.
                pending = (
                    existing.state == pb.Task.STATE_OPEN
                    and item.state != pb.Task.STATE_OPEN
                    and existing.create_time == existing.update_time
                    and _same_content(existing, item.request.task)
                )
                if pending:
                    restore.append((item, existing))
        created = await self._create(missing)
        for item, task in restore:
            if await self._set_state(item, task):
                self.report.restored += 1
        for item, task in created:
            if item.state != pb.Task.STATE_OPEN:
                await self._set_state(item, task)

    async def _create(self, items: list[ImportItem]) -> list[tuple[ImportItem, pb.Task]]:
        """BatchCreateTasks of items; a bad item is reported and the rest sent
        again, a batch too large for one response is split in two."""
        if not items:
            return []
        try:
            response = await self.stub.BatchCreateTasks(
                _stream(i.request for i in items), timeout=max(self.timeout, 60)
            )
        except grpc.aio.AioRpcError as err:
            info = error_details(err)
            if info.reason == "BATCH_RESPONSE_TOO_LARGE" and len(items) > 1:
                half = len(items) // 2
                return [*await self._create(items[:half]), *await self._create(items[half:])]
            if err.code() == grpc.StatusCode.ALREADY_EXISTS:  # created meanwhile by another
                taken = [n for n, i in enumerate(items) if i.name == info.metadata.get("name")]
                if taken:
                    self.report.present += 1
                    return await self._create(items[: taken[0]] + items[taken[0] + 1 :])
            index = _violated_index(err)
            if index is not None and index < len(items):
                self.report.failures.append((items[index].line, _lines_named(err, items)))
                return await self._create(items[:index] + items[index + 1 :])
            for item in items:
                self.report.failures.append((item.line, describe_error(err)))
            return []
        self.report.created += len(response.tasks)
        if self.output.as_json:
            self.output.tasks(response.tasks)
        return list(zip(items, response.tasks, strict=True))

    async def _set_state(self, item: ImportItem, task: pb.Task) -> bool:
        request = pb.UpdateTaskRequest(
            task=pb.Task(name=task.name, state=item.state, etag=task.etag),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=["state"]),
        )
        try:
            await self.stub.UpdateTask(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            self.report.failures.append(
                (item.line, f"created, but its state: {describe_error(err)}")
            )
            return False
        return True


def _lines_named(err: grpc.aio.AioRpcError, items: Sequence[ImportItem]) -> str:
    """The server's error, with requests[i] turned into the file's line numbers."""

    def line_of(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return f"line {items[index].line}" if index < len(items) else match.group(0)

    return re.sub(r"requests\[(\d+)\]", line_of, describe_error(err))


async def import_file(
    stub: Any, path: str, output: Output, errors: TextIO, timeout: float, chunk_size: int = CHUNK
) -> ImportReport:
    if path == "-":  # stdin: `taskctl export | taskctl --target other import -`
        raw = await asyncio.to_thread(sys.stdin.buffer.read)
        file_key = "<stdin>"
    else:
        with open(path, "rb") as f:
            raw = f.read()
        file_key = os.path.realpath(path)
    lines = [
        (n, line) for n, line in enumerate(raw.decode("utf-8").splitlines(), 1) if line.strip()
    ]
    importer = Importer(stub, timeout, output)
    done = 0
    for start in range(0, len(lines), chunk_size):
        batch = lines[start : start + chunk_size]
        items: list[ImportItem] = []
        for number, text in batch:
            try:
                items.append(parse_line(text, number, file_key))
            except (ValueError, json_format.ParseError) as exc:
                importer.report.failures.append((number, f"not a task: {exc}"))
        await importer.chunk(items)
        done += len(batch)
        _progress(done, len(lines), errors)
    if errors.isatty() and lines:
        errors.write("\n")
    return importer.report


# -- commands ---------------------------------------------------------------


async def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    output = Output(args.json, out, getattr(args, "field", None))
    credentials = bearer_token_credentials(args.id_token) if args.id_token else None
    async with connect(args.target, call_credentials=credentials) as client:
        stub = client.stub
        timeout = args.timeout
        await client.connected(timeout)
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
            task = await stub.GetTask(pb.GetTaskRequest(name=task_name(args.task)), timeout=timeout)
            output.tasks([task])
        elif args.command == "list":
            await _list(stub, args, output, timeout)
        elif args.command == "update":
            return await _update(stub, args, output, err, timeout)
        elif args.command == "delete":
            await stub.DeleteTask(
                pb.DeleteTaskRequest(name=task_name(args.task), etag=args.etag or ""),
                timeout=timeout,
            )
            if not args.json:
                out.write(f"deleted {task_name(args.task)}\n")
        elif args.command == "import":
            report = await import_file(stub, args.file, output, err, timeout, args.chunk_size)
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
        elif args.command == "export":
            await _export(stub, args, out, timeout)
        elif args.command == "watch":
            return await _watch(client, args, out, err)
    return 0


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
        line += f"  {state}  {_cell(t.title, 50)}"
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


async def _watch(client: TaskClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
                out.write(json.dumps(_to_dict(event), ensure_ascii=False) + "\n")
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
        return
    output.tasks(page.tasks)
    if page.next_page_token and output.field is None:
        output.out.write(f"next page: --page-token {page.next_page_token}\n")


async def _export(stub: Any, args: argparse.Namespace, out: TextIO, timeout: float) -> None:
    async for page in _pages(stub, args, 200, timeout):
        for task in page.tasks:
            out.write(json.dumps(_to_dict(task), ensure_ascii=False) + "\n")


async def _update(
    stub: Any, args: argparse.Namespace, output: Output, err: TextIO, timeout: float
) -> int:
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


def _global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The flags every subcommand takes, before or after it: the top-level
    parser holds the defaults, the subcommands add them with SUPPRESS so that
    a value given before the subcommand is not reset."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--target",
        default=default(os.environ.get("TASKCTL_TARGET", DEFAULT_TARGET)),
        help="host:port or https URL (env TASKCTL_TARGET; default localhost:8080)",
    )
    parser.add_argument(
        "--id-token",
        default=default(os.environ.get("TASKCTL_ID_TOKEN")),
        help="bearer ID token for a TLS target (env TASKCTL_ID_TOKEN); default: fetched",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="JSON (in the API's shapes) instead of a table",
    )
    parser.add_argument(
        "--timeout", type=float, default=default(10.0), help="seconds per call (default 10)"
    )


_PRIORITY_HELP = "low, medium, high or critical (any case; PRIORITY_HIGH works too)"
_STATE_HELP = "open, in_progress, done or cancelled (any case; STATE_DONE works too)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskctl", description="Talk to a TaskService.")
    _global_flags(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, top=False)
    shows = argparse.ArgumentParser(add_help=False)
    shows.add_argument(
        "--field", choices=FIELDS, help="print only this field of each task, one per line"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    create = sub.add_parser("create", parents=[common, shows], help="create a task")
    create.add_argument("title")
    create.add_argument("--description")
    create.add_argument("--priority", type=_PRIORITY_FLAG, metavar="PRIORITY", help=_PRIORITY_HELP)
    create.add_argument("--assignee")
    create.add_argument("--tag", action="append", default=[])
    create.add_argument("--id", help="task id (default: the server picks one)")
    create.add_argument("--request-id", help="UUID making the create idempotent (default: new)")

    get = sub.add_parser("get", parents=[common, shows], help="show a task")
    get.add_argument("task", help="task id or tasks/{id}")

    lst = sub.add_parser("list", parents=[common, shows], help="list tasks")
    lst.add_argument("--filter", help='e.g. state = STATE_OPEN AND tags:"ops"')
    lst.add_argument("--order-by", help='"create_time desc" (default), "update_time", ...')
    lst.add_argument("--page-size", type=int, default=0)
    lst.add_argument("--page-token")
    lst.add_argument("--all", action="store_true", help="every page")

    update = sub.add_parser("update", parents=[common, shows], help="change fields of a task")
    update.add_argument("task")
    update.add_argument("--title")
    update.add_argument("--description")
    update.add_argument("--priority", type=_PRIORITY_FLAG, metavar="PRIORITY", help=_PRIORITY_HELP)
    update.add_argument("--state", type=_STATE_FLAG, metavar="STATE", help=_STATE_HELP)
    update.add_argument("--assignee", help='"" clears it')
    update.add_argument("--tag", action="append", help="replaces all tags (repeat)")
    update.add_argument("--clear-tags", action="store_true")
    guard = update.add_mutually_exclusive_group()
    guard.add_argument("--etag", help="fail with ABORTED unless this is the current etag")
    guard.add_argument(
        "--if-unchanged",
        action="store_true",
        help="read the current etag first and update only that version",
    )

    delete = sub.add_parser("delete", parents=[common], help="delete a task")
    delete.add_argument("task")
    delete.add_argument("--etag")

    imp = sub.add_parser(
        "import", parents=[common], help="restore tasks from a JSONL file (export's output)"
    )
    imp.add_argument("file", help="the JSONL file; - reads stdin")
    imp.add_argument(
        "--chunk-size", type=int, default=CHUNK, choices=range(1, CHUNK + 1), metavar="N"
    )

    exp = sub.add_parser("export", parents=[common], help="write every task as JSON lines")
    exp.add_argument("--filter")
    exp.add_argument("--order-by")

    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="print changes to tasks as they happen, until Ctrl-C; then how to continue",
    )
    watch.add_argument("--filter", help="as for list")
    watch.add_argument(
        "--initial", action="store_true", help="first print every matching task (as ADDED)"
    )
    watch.add_argument("--resume-token", help="continue after the event this token came with")
    watch.add_argument("--progress", action="store_true", help="also print PROGRESS events")
    watch.add_argument("--max-events", type=int, default=0, help="stop after N events")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args, sys.stdout, sys.stderr))
    except KeyboardInterrupt:  # Ctrl-C (taskctl watch prints how to continue first)
        return 130
    except BrokenPipeError:
        # The reader went away (`taskctl export | head -1`): end quietly, as
        # Unix tools do, without Python's own complaint when it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for such a tool
    except grpc.aio.AioRpcError as err:
        print(f"taskctl: {describe_error(err)}", file=sys.stderr)
        return 1
    except (CliError, OSError, ValueError, Unreachable) as err:
        print(f"taskctl: {err}", file=sys.stderr)
        return 2 if isinstance(err, CliError) else 1
