"""A task as a row of table `tasks` and as the JSON image the change log
keeps, and a list filter as SQL conditions. JSON is written and read with
orjson (several times faster than the json module, on every read and write
of a task); any JSON the json module wrote reads the same."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import orjson

from taskservice.domain.model import PRIORITIES, STATES, Task, TaskContent, TaskFilter

COLUMNS = "task_id, title, description, priority, state, assignee, tags, create_ns, update_ns"
# A row of those columns (tags as a JSON array).
TaskRow: TypeAlias = tuple[str, str, str, int, int, str, str, int, int]


def row_to_task(row: TaskRow) -> Task:
    return Task(
        task_id=row[0],
        content=TaskContent(
            title=row[1],
            description=row[2],
            priority=PRIORITIES[row[3]],
            state=STATES[row[4]],
            assignee=row[5],
            tags=tuple(orjson.loads(row[6])),
        ),
        create_time_ns=row[7],
        update_time_ns=row[8],
        version=row[8],
    )


def tags_json(tags: Sequence[str]) -> str:
    """The tags column: a JSON array (which json_each reads in SQL)."""
    return orjson.dumps(tags).decode()


def task_json(task: Task) -> str:
    c = task.content
    return orjson.dumps(
        [
            c.title,
            c.description,
            int(c.priority),
            int(c.state),
            c.assignee,
            c.tags,
            task.create_time_ns,
            task.update_time_ns,
        ]
    ).decode()


def task_from_json(task_id: str, text: str) -> Task:
    title, description, priority, state, assignee, tags, create_ns, update_ns = orjson.loads(text)
    return Task(
        task_id,
        TaskContent(title, description, PRIORITIES[priority], STATES[state], assignee, tuple(tags)),
        create_ns,
        update_ns,
        update_ns,
    )


def where_of(f: TaskFilter) -> tuple[list[str], list[int | str]]:
    """The SQL conditions (on table `tasks`) of a filter, and their arguments."""
    where: list[str] = []
    args: list[int | str] = []
    if f.state is not None:
        where.append("state = ?")
        args.append(int(f.state))
    if f.priority is not None:
        where.append("priority = ?")
        args.append(int(f.priority))
    if f.assignee is not None:
        where.append("assignee = ?")
        args.append(f.assignee)
    if f.tag is not None:
        where.append("EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE value = ?)")
        args.append(f.tag)
    return where, args
