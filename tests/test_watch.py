"""WatchTasks on both stores, through a real server and channel: what each
event means, the initial snapshot, per-task order under 64 concurrent
writers reconciled against what the writers were told, exact resumes (after
a restart, on another instance, inside an initial snapshot), and the limits
(a reader too slow, too many watchers, the age limit, expired tokens).

On Firestore an event reports a task at a consistent snapshot, so several
commits to one task close together may arrive as one event with the latest
version; on SQLite every commit is an event. The reconciliation checks what
holds on both (versions strictly increase per task, none twice, none that no
writer was told of, the last one is the last acknowledged) and, on SQLite,
that every acknowledged version was seen.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import signal
import struct
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from harness import (
    CuttableProxy,
    Running,
    ServerProcess,
    firestore_store,
    health_serving,
    start_server,
)
from taskservice.client import TaskClient, open_channel
from taskservice.config import Config
from taskservice.domain.model import TaskFilter, version_of
from taskservice.store import TaskStore
from taskservice.store.sqlite import SqliteStore
from tests.helpers import create_request, details_of, expect_error
from tests.reliability import record

Event = pb.WatchTasksResponse
ADDED, MODIFIED, REMOVED = Event.TYPE_ADDED, Event.TYPE_MODIFIED, Event.TYPE_REMOVED
CURRENT, PROGRESS = Event.TYPE_CURRENT, Event.TYPE_PROGRESS
DELETED, NO_LONGER = Event.REMOVAL_REASON_DELETED, Event.REMOVAL_REASON_NO_LONGER_MATCHES
EVENT_TIMEOUT = 10.0


def config(**kwargs: Any) -> Config:
    return Config(host="127.0.0.1", port=0, grace_seconds=1.0, **kwargs)


class Watch:
    """One WatchTasks stream, read in the background into `events`."""

    def __init__(self, stub: Any, request: pb.WatchTasksRequest) -> None:
        self.call = stub.WatchTasks(request)
        self.events: list[pb.WatchTasksResponse] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._arrived = asyncio.Event()
        self._taken = 0  # task events handed out by next_changes
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.call:
                self.events.append(event)
                self._arrived.set()
        except grpc.aio.AioRpcError as err:
            self.error = err
        self._arrived.set()

    async def until(
        self, done: Callable[[list[pb.WatchTasksResponse]], bool], timeout: float = EVENT_TIMEOUT
    ) -> list[pb.WatchTasksResponse]:
        async with asyncio.timeout(timeout):
            while not done(self.events):
                if self.error is not None:
                    raise self.error
                self._arrived.clear()
                await self._arrived.wait()
        return self.events

    async def next_changes(self, count: int) -> list[pb.WatchTasksResponse]:
        """The next `count` task events (not CURRENT or PROGRESS) not yet
        taken by an earlier call; waits for them."""
        start = self._taken
        await self.until(lambda e: len(changes(e)) >= start + count)
        self._taken = start + count
        return changes(self.events)[start : start + count]

    def skip_seen(self) -> None:
        """next_changes starts after the task events received so far."""
        self._taken = len(changes(self.events))

    async def ended(self, timeout: float = EVENT_TIMEOUT) -> grpc.aio.AioRpcError:
        async with asyncio.timeout(timeout):
            await self._reader
        assert self.error is not None, "the stream ended with OK"
        return self.error

    def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()


def changes(events: Iterable[pb.WatchTasksResponse]) -> list[pb.WatchTasksResponse]:
    return [e for e in events if e.type in (ADDED, MODIFIED, REMOVED)]


def summary(events: Iterable[pb.WatchTasksResponse]) -> list[tuple[str, str, int]]:
    return [
        (Event.Type.Name(e.type).removeprefix("TYPE_"), e.name, e.removal_reason) for e in events
    ]


async def update(stub: Any, name: str, **fields: Any) -> pb.Task:
    task: pb.Task = await stub.UpdateTask(
        pb.UpdateTaskRequest(
            task=pb.Task(name=name, **fields), update_mask=field_mask_pb2.FieldMask(paths=fields)
        )
    )
    return task


@pytest.fixture
async def served(store: TaskStore) -> AsyncIterator[Running]:
    running = await start_server(store, config())
    yield running
    await running.close(grace=0.5)


# -- what the events mean ---------------------------------------------------------


async def test_initial_tasks_then_current_then_live(served: Running) -> None:
    stub = served.stub
    for task_id, state in (("b", None), ("a", None), ("c", pb.Task.STATE_DONE)):
        created = await stub.CreateTask(create_request(task_id, task_id=task_id))
        if state is not None:
            await update(stub, created.name, state=state)
    watch = Watch(stub, pb.WatchTasksRequest(filter="state = STATE_OPEN", include_initial=True))
    try:
        first = await watch.until(lambda e: any(x.type == CURRENT for x in e))
        assert summary(first) == [
            ("ADDED", "tasks/a", 0),
            ("ADDED", "tasks/b", 0),
            ("CURRENT", "", 0),
        ]
        assert first[0].task.title == "a" and first[0].task.etag
        assert first[0].commit_time == first[0].task.update_time
        watch.skip_seen()
        created = await stub.CreateTask(create_request("d", task_id="d"))
        (live,) = await watch.next_changes(1)
        assert summary([live]) == [("ADDED", "tasks/d", 0)]
        assert live.task == created and live.commit_time == created.update_time
        assert all(e.resume_token for e in watch.events)
    finally:
        watch.close()

    fresh = Watch(stub, pb.WatchTasksRequest(filter="state = STATE_OPEN"))
    try:
        (only,) = await fresh.until(lambda e: len(e) >= 1)
        assert only.type == CURRENT and not only.name and not only.HasField("task")
    finally:
        fresh.close()


async def test_added_modified_removed_follow_the_filter(served: Running) -> None:
    stub = served.stub
    watch = Watch(
        stub, pb.WatchTasksRequest(filter='state = STATE_OPEN AND assignee = "ana" AND tags:"ops"')
    )
    try:
        await watch.until(lambda e: bool(e) and e[0].type == CURRENT)
        await stub.CreateTask(create_request("elsewhere", assignee="bo", tags=["ops"]))
        task = await stub.CreateTask(create_request("mine", assignee="ana", tags=["ops", "x"]))
        expected = [("ADDED", task.name, 0)]
        assert summary(await watch.next_changes(1)) == expected

        changed = await update(stub, task.name, title="renamed")
        (modified,) = await watch.next_changes(1)
        assert summary([modified]) == [("MODIFIED", task.name, 0)]
        assert modified.task == changed

        done = await update(stub, task.name, state=pb.Task.STATE_DONE)
        (left,) = await watch.next_changes(1)
        assert summary([left]) == [("REMOVED", task.name, NO_LONGER)]
        assert left.task == done  # as it is now: it no longer matches

        await update(stub, task.name, state=pb.Task.STATE_OPEN)
        assert summary(await watch.next_changes(1)) == [("ADDED", task.name, 0)]
        await update(stub, task.name, tags=["x"])
        assert summary(await watch.next_changes(1)) == [("REMOVED", task.name, NO_LONGER)]
        await update(stub, task.name, tags=["ops"])
        assert summary(await watch.next_changes(1)) == [("ADDED", task.name, 0)]

        before = time.time_ns()
        await stub.DeleteTask(pb.DeleteTaskRequest(name=task.name))
        (gone,) = await watch.next_changes(1)
        assert summary([gone]) == [("REMOVED", task.name, DELETED)]
        assert not gone.HasField("task")
        assert gone.commit_time.ToNanoseconds() >= before - 10**9
        # Nothing about tasks that never matched.
        assert all(e.name == task.name for e in changes(watch.events))
    finally:
        watch.close()


async def test_bad_requests_are_invalid_argument_naming_the_field(served: Running) -> None:
    stub = served.stub

    async def first_event(request: pb.WatchTasksRequest) -> None:
        async for _ in stub.WatchTasks(request, timeout=5):
            return

    bad = await expect_error(
        first_event(pb.WatchTasksRequest(filter="state = NOPE")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert bad.fields == ["filter"]
    for token in ("garbage", "A" * 600, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"):
        bad = await expect_error(
            first_event(pb.WatchTasksRequest(resume_token=token)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert bad.fields == ["resume_token"] and bad.reason == "INVALID_RESUME_TOKEN"
    async for event in stub.WatchTasks(pb.WatchTasksRequest(filter="state = STATE_OPEN")):
        token = event.resume_token
        break
    other = await expect_error(
        first_event(pb.WatchTasksRequest(filter="state = STATE_DONE", resume_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert other.fields == ["resume_token"] and "filter" in other.message


# -- order and exactness under concurrent writers --------------------------------------


async def test_64_writers_reconcile_with_every_watcher(served: Running, store: TaskStore) -> None:
    """64 writers create, update and delete; three watchers (everything;
    STATE_OPEN; everything, but reconnecting with its resume token every few
    events) must agree with what the writers were acknowledged."""
    stub = served.stub
    channels = [grpc.aio.insecure_channel(served.target) for _ in range(4)]
    stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in channels]
    shared = [
        (await stub.CreateTask(create_request(f"s{i}", task_id=f"s{i}"))).name for i in range(16)
    ]
    everything = Watch(stub, pb.WatchTasksRequest())
    open_only = Watch(stub, pb.WatchTasksRequest(filter="state = STATE_OPEN"))
    await everything.until(lambda e: bool(e))
    await open_only.until(lambda e: bool(e))
    hopping: list[pb.WatchTasksResponse] = []
    hopping_calls: list[Any] = []
    hop_retries: list[str] = []  # UNAVAILABLE endings the hopper resumed past
    stop_hopping = asyncio.Event()

    async def hop() -> None:
        """Reads 1-7 events per stream, then resumes on a new one."""
        token = ""
        while not stop_hopping.is_set():
            call = stub.WatchTasks(pb.WatchTasksRequest(resume_token=token))
            hopping_calls.append(call)
            try:
                take = random.randint(1, 7)
                async for event in call:
                    hopping.append(event)
                    token = event.resume_token
                    take -= 1
                    if take == 0 or stop_hopping.is_set():
                        break
            except grpc.aio.AioRpcError as err:
                # UNAVAILABLE is the documented "reconnect with your last
                # resume_token" (the emulator resets connections under this
                # load): do as taskservice.client.watch does, a bounded
                # number of times.
                if stop_hopping.is_set():
                    return
                if err.code() != grpc.StatusCode.UNAVAILABLE or len(hop_retries) >= 5:
                    raise
                hop_retries.append(err.details() or "")
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                if not stop_hopping.is_set():
                    raise
            finally:
                call.cancel()

    hopper = asyncio.create_task(hop())
    acked: dict[str, list[int]] = defaultdict(list)  # task name -> versions acknowledged
    deleted: set[str] = set()
    states: dict[str, int] = {}
    lock = asyncio.Lock()

    uncertain: set[str] = set()  # a write to it failed in transit: it may have landed

    async def writer(n: int) -> None:
        rng = random.Random(n)
        w = stubs[n % len(stubs)]
        mine: list[str] = []
        for step in range(12):
            roll = rng.random()
            name = f"tasks/w{n}-{step}"
            try:
                if roll < 0.2 or not mine:
                    task = await w.CreateTask(create_request(name, task_id=name[6:]))
                    mine.append(task.name)
                elif roll < 0.3:
                    name = mine.pop()
                    await w.DeleteTask(pb.DeleteTaskRequest(name=name))
                    async with lock:
                        deleted.add(name)
                    continue
                else:
                    name = rng.choice(shared + mine)
                    state = rng.choice([pb.Task.STATE_OPEN, pb.Task.STATE_IN_PROGRESS])
                    task = await update(w, name, title=f"w{n}-{step}", state=state)
            except grpc.aio.AioRpcError as err:
                # ABORTED: contention on a shared task, told and not written.
                # UNAVAILABLE: the store's connection failed (the emulator
                # does, now and then, under this load): it may have landed.
                assert err.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE), err
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    async with lock:
                        uncertain.add(name)
                continue
            async with lock:
                acked[task.name].append(version_of(task.etag) or 0)

    started = time.monotonic()
    await asyncio.gather(*(writer(n) for n in range(64)))
    wrote_s = time.monotonic() - started
    # What the store holds now is what every watcher must end with.
    final: dict[str, int] = {}
    states: dict[str, int] = {}
    reads_retried = 0

    async def read(name: str) -> pb.Task:
        """GetTask as the documented client does it: UNAVAILABLE (the
        emulator drops its connections now and then under this load) is
        retried, a few times."""
        nonlocal reads_retried
        for attempt in range(5):
            try:
                task: pb.Task = await stub.GetTask(pb.GetTaskRequest(name=name))
                return task
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                    raise
            reads_retried += 1
            await asyncio.sleep(0.25 * (attempt + 1))
        raise AssertionError("unreachable")

    for name in set(acked) | uncertain | deleted:
        try:
            task = await read(name)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            deleted.add(name)
            continue
        final[name] = version_of(task.etag) or 0
        states[name] = task.state
    deleted -= set(final)

    def settled(events: list[pb.WatchTasksResponse], names: dict[str, int]) -> bool:
        last: dict[str, pb.WatchTasksResponse] = {}
        for e in changes(events):
            last[e.name] = e
        for name, version in names.items():
            e = last.get(name)
            if e is None or e.type == REMOVED or version_of(e.task.etag) != version:
                return False
        return all(last[n].type == REMOVED for n in deleted if n in last)

    await everything.until(lambda e: settled(e, final), 60)
    want_open = {n: v for n, v in final.items() if states[n] == pb.Task.STATE_OPEN}
    await open_only.until(lambda e: settled(e, want_open), 60)
    await asyncio.sleep(0.5)  # anything late would show up as a duplicate
    stop_hopping.set()
    hopping_calls[-1].cancel()
    await asyncio.wait_for(hopper, 30)
    for c in channels:
        await c.close()
    everything.close()
    open_only.close()

    def check(events: list[pb.WatchTasksResponse], label: str, every_version: bool) -> int:
        seen: dict[str, list[int]] = defaultdict(list)
        for e in changes(events):
            if e.type == REMOVED and e.removal_reason == DELETED:
                assert e.name in deleted or e.name in uncertain, (label, e.name)
                seen[e.name].append(-1)
                continue
            version = version_of(e.task.etag) or 0
            if e.name not in uncertain:  # no version that no writer was told of
                assert version in acked[e.name], (label, e)
            seen[e.name].append(version)
        for name, versions in seen.items():
            live = [v for v in versions if v != -1]
            assert live == sorted(live) and len(set(live)) == len(live), (label, name, versions)
            if every_version:
                assert set(acked[name]) <= set(live), (label, name, acked[name], live)
        return sum(len(v) for v in seen.values())

    exact = store.kind == "sqlite"
    counts = {
        "everything": check(everything.events, "everything", exact),
        "open": check(open_only.events, "open", False),
        "hopping": check(hopping, "hopping", exact),
    }
    if exact:  # one commit, one event: the hopping watcher saw the same sequence
        assert summary(changes(hopping)) == summary(changes(everything.events))
    record(
        "watch_64_writers",
        store=store.kind,
        acknowledged_writes=sum(len(v) for v in acked.values()) + len(deleted),
        writes_failed_in_transit=len(uncertain),
        write_seconds=round(wrote_s, 2),
        events=counts,
        streams_while_hopping=len(hopping_calls),
        hopper_resumed_after_unavailable=len(hop_retries),
        reconciliation_reads_retried=reads_retried,
    )


async def test_a_resume_inside_the_initial_tasks_continues_them(served: Running) -> None:
    stub = served.stub
    for i in range(6):
        await stub.CreateTask(create_request(f"t{i}", task_id=f"t{i}"))
    first = Watch(stub, pb.WatchTasksRequest(include_initial=True))
    events = await first.until(lambda e: len(e) >= 3)
    first.close()
    assert summary(events[:3]) == [("ADDED", f"tasks/t{i}", 0) for i in range(3)]
    token = events[2].resume_token  # after t0, t1, t2
    await stub.DeleteTask(pb.DeleteTaskRequest(name="tasks/t4"))  # after the snapshot
    await update(stub, "tasks/t1", title="changed")
    again = Watch(stub, pb.WatchTasksRequest(resume_token=token, include_initial=True))
    try:
        rest = await again.until(lambda e: len(changes(e)) >= 5)
        assert summary(rest[:4]) == [
            ("ADDED", "tasks/t3", 0),
            ("ADDED", "tasks/t4", 0),  # as of the snapshot the token belongs to
            ("ADDED", "tasks/t5", 0),
            ("CURRENT", "", 0),
        ]
        assert sorted(summary(changes(rest[4:]))) == [
            ("MODIFIED", "tasks/t1", 0),
            ("REMOVED", "tasks/t4", DELETED),
        ]
    finally:
        again.close()


async def test_each_resume_token_continues_exactly_after_its_event(served: Running) -> None:
    stub = served.stub
    watch = Watch(stub, pb.WatchTasksRequest())
    await watch.until(lambda e: bool(e))
    names = []
    for i in range(4):
        names.append((await stub.CreateTask(create_request(f"r{i}", task_id=f"r{i}"))).name)
        await watch.next_changes(1)
    await update(stub, names[0], title="r0 again")
    await watch.next_changes(1)
    await stub.DeleteTask(pb.DeleteTaskRequest(name=names[1]))
    await watch.next_changes(1)
    watch.close()
    events = watch.events

    def apply(events: list[pb.WatchTasksResponse]) -> dict[str, str]:
        """The view a client keeps from these events: name -> etag."""
        view: dict[str, str] = {}
        for e in changes(events):
            if e.type == REMOVED:
                view.pop(e.name, None)
            else:
                view[e.name] = e.task.etag
        return view

    final = apply(events)
    for i, event in enumerate(events):
        later = changes(events[i + 1 :])
        again = Watch(stub, pb.WatchTasksRequest(resume_token=event.resume_token))
        try:
            if served.server.store.kind == "sqlite":
                await again.until(lambda e, want=later: len(changes(e)) >= len(want))
                await asyncio.sleep(0.2)
                assert summary(changes(again.events)) == summary(later), i
            else:
                # Firestore recomputes the past from snapshots: a task's
                # events may merge (a task created and deleted in between may
                # not show at all), but the client ends with the same view.
                def resumed(e: list[pb.WatchTasksResponse], upto: int = i) -> dict[str, str]:
                    return apply(events[: upto + 1] + e)

                await again.until(lambda e: resumed(e) == final)
                await asyncio.sleep(0.2)
                assert resumed(again.events) == final, i
        finally:
            again.close()


# -- limits ------------------------------------------------------------------------------


async def test_watchers_are_bounded_apart_from_calls(store: TaskStore) -> None:
    running = await start_server(store, config(max_watchers=3, max_concurrent_rpcs=2))
    try:
        watches = [Watch(running.stub, pb.WatchTasksRequest()) for _ in range(3)]
        for w in watches:
            await w.until(lambda e: bool(e))
        refused = Watch(running.stub, pb.WatchTasksRequest())
        details = details_of(await refused.ended())
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "TOO_MANY_WATCHERS"
        # Three watchers open, two calls allowed: CRUD still works.
        created = await asyncio.gather(
            *(running.stub.CreateTask(create_request("x")) for _ in range(2))
        )
        assert all(c.name for c in created)
        for w in watches:
            await w.next_changes(2)
            w.close()
    finally:
        await running.close(grace=0.5)


async def test_a_reader_too_slow_is_ended_with_a_resume_token(store: TaskStore) -> None:
    running = await start_server(store, config(watch_buffer=20))
    stub = running.stub
    # A client that reads nothing still takes what its flow-control window
    # holds (grpc grows it to megabytes by itself); keep it at 64 KiB so that
    # a few hundred events are enough to fill it.
    small_window = grpc.aio.insecure_channel(
        running.target, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]
    )
    try:
        task = await stub.CreateTask(create_request("big", description="d" * 2000))
        call = task_service_pb2_grpc.TaskServiceStub(small_window).WatchTasks(
            pb.WatchTasksRequest()
        )
        assert (await call.read()).type == CURRENT  # then it reads nothing
        for i in range(300):
            await update(stub, task.name, title=f"v{i}")
            if store.kind == "firestore":
                await asyncio.sleep(0.005)  # let snapshots come one by one
        received: list[pb.WatchTasksResponse] = []
        try:
            async with asyncio.timeout(30):
                while (event := await call.read()) is not grpc.aio.EOF:
                    received.append(event)
            raise AssertionError("the stream was not ended")
        except grpc.aio.AioRpcError as err:
            details = details_of(err)
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "WATCHER_TOO_SLOW"
        token = details.metadata["resume_token"]
        assert token == received[-1].resume_token  # the last event written
        rest = Watch(stub, pb.WatchTasksRequest(resume_token=token))
        final = await stub.GetTask(pb.GetTaskRequest(name=task.name))
        tail = await rest.until(
            lambda e: any(x.type == MODIFIED and x.task.etag == final.etag for x in e)
        )
        rest.close()
        versions = [version_of(e.task.etag) for e in changes(received + tail)]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        if store.kind == "sqlite":
            assert len(versions) == 300
        record(
            "watch_slow_reader",
            store=store.kind,
            buffer_events=20,
            received_before_end=len(received),
            resumed_events=len(changes(tail)),
        )
    finally:
        await small_window.close()
        await running.close(grace=0.5)


async def test_streams_end_before_their_age_limit_and_resume(store: TaskStore) -> None:
    running = await start_server(store, config(watch_max_seconds=2, watch_progress_seconds=1))
    try:
        watch = Watch(running.stub, pb.WatchTasksRequest())
        started = time.monotonic()
        err = await watch.ended(10)
        details = details_of(err)
        assert details.code == grpc.StatusCode.UNAVAILABLE and details.reason == "STREAM_MAX_AGE"
        assert 1.9 < time.monotonic() - started < 5
        kinds = [e.type for e in watch.events]
        assert kinds[0] == CURRENT and PROGRESS in kinds  # idle: progress every second
        assert details.metadata["resume_token"] == watch.events[-1].resume_token
        task = await running.stub.CreateTask(create_request("after"))
        again = Watch(
            running.stub, pb.WatchTasksRequest(resume_token=details.metadata["resume_token"])
        )
        (added,) = await again.next_changes(1)
        assert added.name == task.name and added.type == ADDED
        again.close()
    finally:
        await running.close(grace=0.5)


async def test_an_expired_token_is_out_of_range(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    for store in (
        SqliteStore(tmp_path / "t.db", watch_retention_seconds=1),
        firestore_store(request.getfixturevalue("emulator").host, watch_retention_seconds=1),
    ):
        running = await start_server(store, config())
        try:
            watch = Watch(running.stub, pb.WatchTasksRequest())
            (current,) = await watch.until(lambda e: bool(e))
            watch.close()
            await running.stub.CreateTask(create_request("one"))
            await asyncio.sleep(1.2)
            await running.stub.CreateTask(create_request("two"))  # SQLite trims here
            await asyncio.sleep(0.1)
            late = Watch(running.stub, pb.WatchTasksRequest(resume_token=current.resume_token))
            details = details_of(await late.ended())
            assert details.code == grpc.StatusCode.OUT_OF_RANGE, store.kind
            assert details.reason == "RESUME_TOKEN_EXPIRED"
            assert "list the tasks again" in details.message
        finally:
            await running.close(grace=0.5)
            await store.close()


async def test_a_token_of_another_database_is_invalid_argument(tmp_path: Path) -> None:
    """A token names the store that issued it: one from another SQLite file
    is INVALID_ARGUMENT whichever of the two change logs is longer (it was
    OUT_OF_RANGE when the other log was longer, INVALID_ARGUMENT otherwise)."""
    short = await start_server(SqliteStore(tmp_path / "short.db"), config())
    long = await start_server(SqliteStore(tmp_path / "long.db"), config())
    try:
        for i in range(5):
            await long.stub.CreateTask(create_request(f"t{i}"))
        tokens = {}
        for name, running in (("short", short), ("long", long)):
            async for event in running.stub.WatchTasks(pb.WatchTasksRequest()):
                tokens[name] = event.resume_token
                break
        for token, elsewhere in ((tokens["short"], long), (tokens["long"], short)):
            other = Watch(elsewhere.stub, pb.WatchTasksRequest(resume_token=token))
            details = details_of(await other.ended())
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert details.reason == "INVALID_RESUME_TOKEN" and details.fields == ["resume_token"]
            assert "another" in details.message
    finally:
        await short.close()
        await long.close()


async def test_firestore_tokens_the_service_never_issued_are_invalid_argument(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """Positions no Firestore read time could be, or of another database,
    sealed as the service seals them: INVALID_ARGUMENT each time, and no
    ERROR line (they were INTERNAL with an ERROR line, or OUT_OF_RANGE)."""
    from taskservice.api.watching import encode_resume_token, filter_fingerprint
    from taskservice.store.firestore._watch import identity

    store = firestore_store(request.getfixturevalue("emulator").host)
    running = await start_server(store, config())
    try:
        await running.stub.CreateTask(create_request("one"))
        here = identity(store.database, store.collection)
        elsewhere = identity("projects/someone-else/databases/(default)", store.collection)
        now_us = time.time_ns() // 1000 * 1000
        forged = {
            "time in nanoseconds": (here, now_us - 2 * 10**9 + 1, now_us - 10**9 + 7),
            "base in nanoseconds": (here, now_us - 2 * 10**9 + 1, now_us - 10**9),
            "time in the future": (here, now_us + 30 * 10**9, now_us + 30 * 10**9),
            "base in the future": (here, now_us - 10**9, now_us + 20 * 10**9),
            "another database": (elsewhere, now_us - 10**9, now_us - 10**9),
        }
        fingerprint = filter_fingerprint(TaskFilter())
        caplog.set_level(logging.ERROR)
        for case, (ident, base_ns, at_ns) in forged.items():
            position = struct.pack(">c8sqq", b"F", ident, base_ns, at_ns)
            token = encode_resume_token(position, fingerprint)
            forged_watch = Watch(running.stub, pb.WatchTasksRequest(resume_token=token))
            try:
                details = details_of(await forged_watch.ended())
            finally:
                forged_watch.close()
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, (case, details)
            assert details.reason == "INVALID_RESUME_TOKEN", (case, details)
            assert details.fields == ["resume_token"], (case, details)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
        # A time a little ahead of this clock (Firestore's may be) is waited for.
        ahead_us = (time.time_ns() + 10**9) // 1000 * 1000
        position = struct.pack(">c8sqq", b"F", here, ahead_us, ahead_us)
        ahead = Watch(
            running.stub,
            pb.WatchTasksRequest(resume_token=encode_resume_token(position, fingerprint)),
        )
        try:
            await asyncio.sleep(1.5)
            task = await running.stub.CreateTask(create_request("two"))
            (added,) = await ahead.next_changes(1)
            assert added.name == task.name and ahead.error is None
        finally:
            ahead.close()
    finally:
        await running.close(grace=0.5)
        await store.close()


async def test_a_resume_rides_out_a_short_store_outage(request: pytest.FixtureRequest) -> None:
    """The network to Firestore fails (connections reset, then refused) for
    1.5 s just as a watcher resumes: the server waits for the store and
    reconnects, and the stream continues exactly, with no error for the
    caller to handle."""
    emulator = request.getfixturevalue("emulator")
    proxy = await CuttableProxy(emulator.host).start()
    store = firestore_store(proxy.target)
    running = await start_server(store, config())
    try:
        stub = running.stub
        for i in range(3):
            await stub.CreateTask(create_request(f"before {i}"))
        watch = Watch(stub, pb.WatchTasksRequest(include_initial=True))
        await watch.until(lambda e: any(x.type == CURRENT for x in e))
        token = watch.events[-1].resume_token
        watch.close()
        later = {(await stub.CreateTask(create_request(f"after {i}"))).name for i in range(3)}
        await proxy.cut()
        started = time.monotonic()
        resumed = Watch(stub, pb.WatchTasksRequest(resume_token=token))
        await asyncio.sleep(1.5)
        assert resumed.error is None, resumed.error
        await proxy.restore()
        got = await resumed.next_changes(3)
        caught_up_s = time.monotonic() - started
        assert {e.name for e in got} == later and {e.type for e in got} == {ADDED}
        await asyncio.sleep(0.5)  # anything repeated would arrive now
        assert len(changes(resumed.events)) == 3 and resumed.error is None
        record("watch_resume_outage", outage_s=1.5, caught_up_s=round(caught_up_s, 2))
        resumed.close()
    finally:
        await running.close(grace=0.5)
        await store.close()
        await proxy.close()


# -- restarts, drains and other instances ---------------------------------------------------


def _process_env(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, project: str
) -> dict[str, str]:
    if kind == "sqlite":
        return {"TASKSERVICE_STORE": "sqlite", "TASKSERVICE_SQLITE_PATH": str(tmp_path / "w.db")}
    return {
        "TASKSERVICE_STORE": "firestore",
        "FIRESTORE_EMULATOR_HOST": request.getfixturevalue("emulator").host,
        "GOOGLE_CLOUD_PROJECT": project,
    }


@pytest.mark.parametrize("kind", ["sqlite", "firestore"])
async def test_drain_ends_every_watch_at_once_with_a_resume_token(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = _process_env(kind, tmp_path, request, f"demo-d{uuid.uuid4().hex[:10]}")
    server = ServerProcess(env, tmp_path)
    channel = grpc.aio.insecure_channel(server.target)
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    try:
        await asyncio.to_thread(server.wait_serving)
        watches = [Watch(stub, pb.WatchTasksRequest()) for _ in range(20)]
        for w in watches:
            await w.until(lambda e: bool(e))
        task = await stub.CreateTask(create_request("before the drain"))
        for w in watches:
            await w.next_changes(1)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        errors = [await w.ended(5) for w in watches]
        ended_s = time.monotonic() - started
        code, output = await asyncio.to_thread(server.finish, 15)
        exit_s = time.monotonic() - started
        for w, err in zip(watches, errors, strict=True):
            details = details_of(err)
            assert details.code == grpc.StatusCode.UNAVAILABLE, details
            assert details.reason == "SERVER_DRAINING"
            assert details.metadata["resume_token"] == w.events[-1].resume_token
        assert watches[0].events[-1].name == task.name
        record(
            "watch_drain",
            store=kind,
            watchers=20,
            ended_s=round(ended_s, 2),
            exit_s=round(exit_s, 2),
        )
        assert code == 0, output[-2000:]
        assert ended_s < 1.0 and exit_s < 3.0
    finally:
        await channel.close()
        server.kill()


@pytest.mark.parametrize("kind", ["sqlite", "firestore"])
async def test_the_client_resumes_across_a_killed_and_restarted_server(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """taskservice.client's watch() under a server that is SIGKILLed and
    started again on the same port (and file, or project) while writes go on:
    every acknowledged write is seen, none twice, in order."""
    env = _process_env(kind, tmp_path, request, f"demo-k{uuid.uuid4().hex[:10]}")
    server = ServerProcess(env, tmp_path)
    port = server.port
    await asyncio.to_thread(server.wait_serving)
    client = TaskClient(open_channel(server.target))
    writer = TaskClient(open_channel(server.target))
    seen: list[pb.WatchTasksResponse] = []
    arrived = asyncio.Event()

    async def follow() -> None:
        async for event in client.watch(include_initial=True):
            seen.append(event)
            arrived.set()

    follower = asyncio.create_task(follow())
    acked: list[pb.Task] = []
    try:
        async with asyncio.timeout(10):
            while not any(e.type == CURRENT for e in seen):
                arrived.clear()
                await arrived.wait()
        for round_ in range(3):
            for i in range(5):
                acked.append(
                    await writer.stub.CreateTask(
                        create_request(f"{round_}-{i}", request_id=str(uuid.uuid4()))
                    )
                )
            server.kill()
            server = ServerProcess(env, tmp_path, port=port)
            await asyncio.to_thread(server.wait_serving)
        for i in range(3):
            acked.append(await writer.stub.CreateTask(create_request(f"last-{i}")))
        want = {t.name for t in acked}
        async with asyncio.timeout(30):
            while not want <= {e.name for e in changes(seen)}:
                arrived.clear()
                await arrived.wait()
        await asyncio.sleep(0.5)
        names = [e.name for e in changes(seen)]
        assert sorted(names) == sorted(want), "an event was lost or repeated"
        assert all(e.type == ADDED for e in changes(seen))
        record("watch_client_across_restarts", store=kind, restarts=3, events=len(names))
    finally:
        follower.cancel()
        await client.close()
        await writer.close()
        server.kill()


async def test_a_write_through_one_instance_reaches_watchers_on_another(
    request: pytest.FixtureRequest,
) -> None:
    """Two instances over one Firestore database (the emulator): a watcher on
    A sees writes made through B, and a token from A resumes on B."""
    host = request.getfixturevalue("emulator").host
    project = f"demo-x{uuid.uuid4().hex[:10]}"
    a = await start_server(firestore_store(host, project=project), config())
    b = await start_server(firestore_store(host, project=project), config())
    try:
        watch = Watch(a.stub, pb.WatchTasksRequest(filter="state = STATE_OPEN"))
        await watch.until(lambda e: bool(e))
        latencies = []
        for i in range(5):
            started = time.monotonic()
            task = await b.stub.CreateTask(create_request(f"via b {i}"))
            (event,) = await watch.next_changes(1)
            latencies.append(time.monotonic() - started)
            assert event.name == task.name and event.type == ADDED
        token = watch.events[-1].resume_token
        watch.close()
        later = await a.stub.CreateTask(create_request("while nobody watched"))
        on_b = Watch(b.stub, pb.WatchTasksRequest(filter="state = STATE_OPEN", resume_token=token))
        (event,) = await on_b.next_changes(1)
        assert event.name == later.name
        await asyncio.sleep(0.3)
        assert len(changes(on_b.events)) == 1
        on_b.close()
        record(
            "watch_cross_instance",
            create_to_event_ms=[round(x * 1000, 1) for x in latencies],
        )
    finally:
        await a.close()
        await b.close()
        await a.server.store.close()


async def test_watchers_on_several_workers_see_every_commit(tmp_path: Path) -> None:
    """SQLite with TASKSERVICE_WORKERS=2: a commit by either process wakes the
    watchers of both (the change log is in the file)."""
    server = ServerProcess(
        {"TASKSERVICE_SQLITE_PATH": str(tmp_path / "w.db"), "TASKSERVICE_WORKERS": "2"}, tmp_path
    )
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(6)]
    try:
        await asyncio.to_thread(server.wait_serving)
        stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in channels]
        watches = [Watch(s, pb.WatchTasksRequest()) for s in stubs[:3]]
        for w in watches:
            await w.until(lambda e: bool(e))
        created = [await s.CreateTask(create_request(f"c{i}")) for i, s in enumerate(stubs * 3)]
        for w in watches:
            got = await w.next_changes(len(created))
            assert sorted(e.name for e in got) == sorted(t.name for t in created)
            w.close()
        code, output = await asyncio.to_thread(server.stop)
        assert code == 0, output[-2000:]
    finally:
        for c in channels:
            await c.close()
        server.kill()


async def test_progress_events_carry_fresh_tokens_when_idle(store: TaskStore) -> None:
    running = await start_server(store, config(watch_progress_seconds=1))
    try:
        watch = Watch(running.stub, pb.WatchTasksRequest())
        events = await watch.until(lambda e: sum(x.type == PROGRESS for x in e) >= 2, 15)
        progress = [e for e in events if e.type == PROGRESS]
        assert progress[1].commit_time.ToNanoseconds() >= progress[0].commit_time.ToNanoseconds()
        if store.kind == "firestore":  # a heartbeat made a newer snapshot
            assert progress[1].commit_time.ToNanoseconds() > events[0].commit_time.ToNanoseconds()
        watch.close()
        task = await running.stub.CreateTask(create_request("after progress"))
        again = Watch(running.stub, pb.WatchTasksRequest(resume_token=progress[-1].resume_token))
        (added,) = await again.next_changes(1)
        assert added.name == task.name
        again.close()
    finally:
        await running.close(grace=0.5)


async def test_health_reports_serving_with_watchers_open(served: Running) -> None:
    watch = Watch(served.stub, pb.WatchTasksRequest())
    await watch.until(lambda e: bool(e))
    await health_serving(served.health)
    watch.close()


async def test_firestore_progress_events_carry_a_fresh_position(
    request: pytest.FixtureRequest,
) -> None:
    """An idle stream's PROGRESS events each name a newer read time, close to
    when they are sent (they repeated old ones: 0, 0, 0, 6, 6 s), so that the
    last one's token is good for as long as the retention says (with 4 s, it
    had already expired)."""
    store = firestore_store(request.getfixturevalue("emulator").host, watch_retention_seconds=4)
    running = await start_server(store, config(watch_progress_seconds=1))
    try:
        watch = Watch(running.stub, pb.WatchTasksRequest())
        arrivals: list[tuple[int, int]] = []  # (arrived, read time), ns

        def progress(events: list[pb.WatchTasksResponse]) -> list[pb.WatchTasksResponse]:
            return [e for e in events if e.type == PROGRESS]

        seen = 0
        deadline = time.monotonic() + 12
        while len(arrivals) < 6 and time.monotonic() < deadline:
            await watch.until(lambda e, n=seen: len(progress(e)) > n, timeout=10)
            for event in progress(watch.events)[seen:]:
                arrivals.append((time.time_ns(), event.commit_time.ToNanoseconds()))
            seen = len(progress(watch.events))
        ages = [round((arrived - at) / 1e9, 2) for arrived, at in arrivals]
        times = [at for _, at in arrivals]
        assert len(arrivals) >= 6, ages
        assert all(b > a for a, b in itertools.pairwise(times)), ages
        assert max(ages) < 2.0, ages
        last = progress(watch.events)[-1].resume_token
        watch.close()
        await asyncio.sleep(1.0)
        task = await running.stub.CreateTask(create_request("after"))
        resumed = Watch(running.stub, pb.WatchTasksRequest(resume_token=last))
        try:
            (added,) = await resumed.next_changes(1)
            assert added.name == task.name and added.type == ADDED
        finally:
            resumed.close()
        record("firestore_progress_age", progress_seconds=1, ages_s=ages)
    finally:
        await running.close(grace=0.5)
        await store.close()
