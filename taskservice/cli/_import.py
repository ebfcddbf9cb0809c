"""taskctl import: restores what export wrote. Every line becomes a task with
a known id (its name; for a line without one, an id derived from the file
(or stdin), the line number and the text), so a task that already exists is
left alone and counted as already present. New tasks start STATE_OPEN, as
the API says; their exported state is then set with an update. Running an
import again, finished or interrupted, creates nothing twice and finishes
what was left."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import grpc
from google.protobuf import field_mask_pb2, json_format
from tasks.v1 import task_service_pb2 as pb

from taskservice.cli._output import (
    MUTABLE,
    Output,
    describe_error,
    violated_index,
)
from taskservice.client import (
    error_details,
)
from taskservice.domain.limits import MAX_BATCH

if TYPE_CHECKING:
    # Only in the generated stubs: what TaskServiceStub(channel) is on a grpc.aio channel.
    from tasks.v1.task_service_pb2_grpc import TaskServiceAsyncStub

CHUNK = MAX_BATCH  # tasks per BatchCreateTasks call, by default and at most
LOOKUPS_IN_FLIGHT = 32
_IMPORT_NAMESPACE = uuid.UUID("6f1d7f7e-7c47-4a53-9b5e-2b8f3c1d9a10")


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
    return all(getattr(task, f) == getattr(wanted, f) for f in MUTABLE)


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

    def __init__(self, stub: TaskServiceAsyncStub, timeout: float, output: Output) -> None:
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
            index = violated_index(err)
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
    stub: TaskServiceAsyncStub,
    path: str,
    output: Output,
    errors: TextIO,
    timeout: float,
    chunk_size: int = CHUNK,
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
