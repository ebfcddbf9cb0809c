"""What taskctl shows and accepts: tasks as a table, JSON or one field,
errors as one line from their google.rpc.Status, and the spellings of enum
values its flags take."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from tasks.v1 import task_service_pb2 as pb

from taskservice.client import (
    error_details,
)

DEFAULT_TARGET = "localhost:8080"
PRIORITIES = {
    name.removeprefix("PRIORITY_").lower(): value
    for name, value in pb.Task.Priority.items()
    if value
}
STATES = {
    name.removeprefix("STATE_").lower(): value for name, value in pb.Task.State.items() if value
}


def _enum_flag(
    values: Mapping[str, int], prefix: str, what: str, example: str
) -> Callable[[str], str]:
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


PRIORITY_FLAG = _enum_flag(PRIORITIES, "PRIORITY_", "priority", "high")
STATE_FLAG = _enum_flag(STATES, "STATE_", "state", "done")
FIELDS = ("name", "title", "description", "priority", "state", "assignee", "tags", "etag")
MUTABLE = ("title", "description", "priority", "assignee", "tags")


class CliError(Exception):
    pass


def task_name(task: str) -> str:
    """tasks/{id} for an id or a name."""
    return task if task.startswith("tasks/") else f"tasks/{task}"


def to_dict(message: Message) -> dict[str, object]:
    result: dict[str, object] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def cell(value: str, width: int) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= width else value[: width - 1] + "…"


def print_table(tasks: Sequence[pb.Task], out: TextIO) -> None:
    rows = [("NAME", "TITLE", "STATE", "PRIORITY", "ASSIGNEE", "TAGS", "ETAG", "UPDATED")]
    for t in tasks:
        rows.append(
            (
                t.name.removeprefix("tasks/"),
                cell(t.title, 40),
                pb.Task.State.Name(t.state).removeprefix("STATE_"),
                pb.Task.Priority.Name(t.priority).removeprefix("PRIORITY_"),
                cell(t.assignee, 24),
                cell(",".join(t.tags), 24),
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


def violated_index(err: grpc.aio.AioRpcError) -> int | None:
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
                value = to_dict(t).get(self.field, "")
                self.out.write((",".join(value) if isinstance(value, list) else str(value)) + "\n")
        elif self.as_json:
            for t in tasks:
                self.out.write(json.dumps(to_dict(t), ensure_ascii=False) + "\n")
        else:
            print_table(tasks, self.out)

    def message(self, message: Message) -> None:
        self.out.write(json.dumps(to_dict(message), ensure_ascii=False) + "\n")
