"""The SQLite engine's group commit: writes that share one transaction and one
fsync still succeed or fail alone, whether a failing write changed rows
before it failed or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest

from taskservice.domain.errors import AlreadyExists, DeadlineExceeded, EtagMismatch, NotFound
from taskservice.domain.model import NewTask, TaskContent, TaskPatch
from taskservice.store.sqlite import SqliteStore


def _new(task_id: str) -> NewTask:
    return NewTask(task_id, TaskContent(title=f"task {task_id}"))


@pytest.mark.parametrize("failing_first", [False, True])
async def test_failing_writes_in_a_group_leave_the_others_whole(
    tmp_path: Path, failing_first: bool
) -> None:
    store = SqliteStore(tmp_path / "tasks.db")
    try:
        (taken,) = await store.create_many([_new("taken")], 5)
        writes: dict[str, Callable[[], Awaitable[object]]] = {
            **{f"fine-{i}": partial(store.create_many, [_new(f"fine-{i}")], 5) for i in range(3)},
            # Changes rows, then fails: its first two tasks must not stay.
            "halfway": partial(
                store.create_many, [_new("half-1"), _new("half-2"), _new("taken")], 5
            ),
            # Fails before changing anything.
            "stale": partial(store.update, "taken", TaskPatch(title="stale"), taken.version - 1, 5),
            "updated": partial(store.update, "taken", TaskPatch(title="new"), None, 5),
        }
        failing = ["halfway", "stale"]
        order = sorted(writes, key=lambda name: (name in failing) != failing_first)
        # One group: the writer is held by a write that sleeps while the
        # others queue behind it, then takes them all at once.
        loop = asyncio.get_running_loop()
        held = loop.create_task(store._engine.write(lambda conn: time.sleep(0.3), 5))
        await asyncio.sleep(0.05)
        tasks = [loop.create_task(writes[name]()) for name in order]
        found = await asyncio.gather(*tasks, return_exceptions=True)
        await held
        results = dict(zip(order, found, strict=True))

        assert isinstance(results["halfway"], AlreadyExists), results["halfway"]
        assert isinstance(results["stale"], EtagMismatch), results["stale"]
        for name in writes.keys() - failing:
            assert not isinstance(results[name], BaseException), (name, results[name])
        for i in range(3):
            assert (await store.get(f"fine-{i}", 5)).content.title == f"task fine-{i}"
        assert (await store.get("taken", 5)).content.title == "new"
        for gone in ("half-1", "half-2"):
            with pytest.raises(NotFound):
                await store.get(gone, 5)
        # The change log holds the writes that stayed, and nothing of the others.
        logged = [
            row[0]
            for row in store._engine.open(1000).execute("SELECT task_id FROM changes ORDER BY seq")
        ]
        assert sorted(logged) == sorted(["taken", "fine-0", "fine-1", "fine-2", "taken"])
    finally:
        await store.close()


async def test_a_write_that_waits_past_its_deadline_fails_and_is_not_written(
    tmp_path: Path,
) -> None:
    """The writer is busy past a write's deadline: the caller gets
    DeadlineExceeded on time, and the write is skipped, not applied late."""
    store = SqliteStore(tmp_path / "tasks.db")
    try:
        await store.create_many([_new("first")], 5)
        loop = asyncio.get_running_loop()
        held = loop.create_task(store._engine.write(lambda conn: time.sleep(0.8), 5))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await store.create_many([_new("late")], 0.2)
        assert 0.2 <= time.monotonic() - started < 0.5
        await held
        with pytest.raises(NotFound):
            await store.get("late", 5)
        (again,) = await store.create_many([_new("late")], 5)  # the id is free
        assert again.task_id == "late"
    finally:
        await store.close()
