"""taskctl, run as a process against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2
from tasks.v1 import task_service_pb2 as pb

from harness import Emulator, Running, firestore_store, free_port, start_server
from taskservice.domain.errors import EtagMismatch
from taskservice.store import TaskStore
from taskservice.store.sqlite import SqliteStore
from tests.helpers import create_request, stream_of


@pytest.fixture
async def empty(
    store: TaskStore, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Running]:
    """A second, empty server over a store of the same kind as `running`'s."""
    other: TaskStore
    if store.kind == "sqlite":
        other = SqliteStore(tmp_path / "empty.db")
    else:
        other = firestore_store(request.getfixturevalue("emulator").host)
    running = await start_server(other)
    yield running
    await running.channel.close()
    await running.server.stop(grace=0)
    await other.close()


async def taskctl(running: Running, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice.cli",
        "--target",
        running.target,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_crud_table_and_json(running: Running) -> None:
    code, out, err = await taskctl(
        running, "create", "Write runbook", "--priority", "high", "--tag", "ops", "--id", "runbook"
    )
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == [
        "NAME",
        "TITLE",
        "STATE",
        "PRIORITY",
        "ASSIGNEE",
        "TAGS",
        "ETAG",
        "UPDATED",
    ]
    assert row.startswith("runbook") and "Write runbook" in row and "HIGH" in row and "OPEN" in row

    code, out, _ = await taskctl(running, "--json", "get", "runbook")
    task = json.loads(out)
    assert task["name"] == "tasks/runbook" and task["tags"] == ["ops"]

    code, out, err = await taskctl(
        running,
        "--json",
        "update",
        "runbook",
        "--state",
        "done",
        "--assignee",
        "ana",
        "--etag",
        task["etag"],
    )
    assert code == 0, err
    updated = json.loads(out)
    assert updated["state"] == "STATE_DONE" and updated["assignee"] == "ana"
    assert updated["title"] == "Write runbook"

    code, _, err = await taskctl(
        running, "update", "runbook", "--title", "x", "--etag", task["etag"]
    )
    assert code == 1 and "ABORTED" in err

    code, _, err = await taskctl(running, "create", "")
    assert code == 1 and "INVALID_ARGUMENT" in err and "task.title" in err

    code, out, _ = await taskctl(running, "--json", "list", "--filter", "state = STATE_DONE")
    assert [t["name"] for t in json.loads(out)["tasks"]] == ["tasks/runbook"]

    code, out, _ = await taskctl(running, "delete", "runbook")
    assert code == 0 and "deleted tasks/runbook" in out
    code, _, err = await taskctl(running, "get", "runbook")
    assert code == 1 and "NOT_FOUND" in err


async def test_global_flags_go_before_or_after_the_subcommand(running: Running) -> None:
    await running.stub.CreateTask(create_request("t", task_id="flags"))
    for args in (
        ("--json", "get", "flags"),
        ("get", "flags", "--json"),
        ("get", "--json", "flags", "--timeout", "5"),
    ):
        code, out, err = await taskctl(running, *args)
        assert code == 0, err
        assert json.loads(out)["name"] == "tasks/flags"
    # --target after the subcommand wins over the one taskctl() puts first.
    code, _, err = await taskctl(
        running, "get", "flags", "--target", "127.0.0.1:1", "--timeout", "1"
    )
    assert code == 1 and "cannot connect to 127.0.0.1:1" in err, err


async def test_the_table_shows_the_etag_and_field_prints_one(running: Running) -> None:
    task = await running.stub.CreateTask(create_request("t", task_id="etagged"))
    code, out, _ = await taskctl(running, "get", "etagged")
    assert code == 0 and task.etag in out.splitlines()[1].split()
    code, out, _ = await taskctl(running, "get", "etagged", "--field", "etag")
    assert code == 0 and out == task.etag + "\n"


async def test_json_list_keeps_the_page_token_and_all_pages_through(running: Running) -> None:
    await running.stub.BatchCreateTasks(stream_of([create_request(f"t{i}") for i in range(5)]))
    code, out, _ = await taskctl(running, "--json", "list", "--page-size", "2")
    first = json.loads(out)
    assert code == 0 and len(first["tasks"]) == 2 and first["next_page_token"]
    code, out, _ = await taskctl(
        running, "--json", "list", "--page-size", "2", "--page-token", first["next_page_token"]
    )
    second = json.loads(out)
    assert {t["name"] for t in second["tasks"]}.isdisjoint(t["name"] for t in first["tasks"])
    code, out, _ = await taskctl(running, "--json", "list", "--all", "--page-size", "2")
    every = json.loads(out)
    assert len(every["tasks"]) == 5 and every["next_page_token"] == ""


async def test_a_closed_pipe_ends_quietly(running: Running) -> None:
    await running.stub.BatchCreateTasks(
        stream_of([create_request(f"t{i}", description="d" * 500) for i in range(400)])
    )
    proc = await asyncio.create_subprocess_shell(
        f"{sys.executable} -m taskservice.cli --target {running.target} export | head -1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert len(out.decode().splitlines()) == 1
    assert err.decode() == "", err.decode()


async def test_update_if_unchanged_reads_the_etag_and_updates_that_version(
    running: Running,
) -> None:
    await running.stub.CreateTask(create_request("t", task_id="guarded"))
    code, out, err = await taskctl(
        running, "--json", "update", "guarded", "--state", "done", "--if-unchanged"
    )
    assert code == 0, err
    assert json.loads(out)["state"] == "STATE_DONE"


class RacedStore(SqliteStore):
    """A real store in which someone else always writes the task first."""

    async def update(self, task_id, patch, expected_version, timeout):  # type: ignore[no-untyped-def]
        if expected_version is not None:
            raise EtagMismatch(f"the etag of tasks/{task_id} is stale")
        return await super().update(task_id, patch, expected_version, timeout)


async def test_update_if_unchanged_says_clearly_when_the_task_changed(tmp_path: Path) -> None:
    raced = await start_server(RacedStore(tmp_path / "t.db"))
    try:
        await raced.stub.CreateTask(create_request("t", task_id="raced"))
        code, out, err = await taskctl(raced, "update", "raced", "--title", "x", "--if-unchanged")
        assert code == 1 and out == ""
        assert "was changed by someone else" in err and "nothing was changed" in err
        assert (await raced.stub.GetTask(pb.GetTaskRequest(name="tasks/raced"))).title == "t"
    finally:
        await raced.channel.close()
        await raced.server.stop(grace=0)


async def test_import_reports_created_present_and_failed_with_line_numbers(
    running: Running, tmp_path: Path
) -> None:
    lines = [json.dumps({"title": f"task {i}", "tags": ["imported"]}) for i in range(1, 1204)]
    lines[699] = "{not json"  # line 700
    lines[1099] = json.dumps({"task": {"title": ""}})  # line 1100, rejected by the server
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = await taskctl(running, "import", str(path))
    assert code == 1
    assert "line 700: not a task" in err
    assert "line 1100: INVALID_ARGUMENT" in err and "task.title" in err
    assert "created 1201, already present 0, failed 2 (lines 700, 1100)" in err

    # Fix the file and import again: only the two fixed lines are new.
    lines[699] = json.dumps({"title": "task 700", "tags": ["imported"]})
    lines[1099] = json.dumps({"title": "task 1100", "tags": ["imported"]})
    path.write_text("\n".join(lines) + "\n")
    code, _, err = await taskctl(running, "import", str(path))
    assert code == 0, err
    assert "created 2, already present 1201, failed 0" in err
    code, out, _ = await taskctl(running, "export", "--filter", 'tags:"imported"')
    titles = [json.loads(line)["title"] for line in out.splitlines()]
    assert sorted(titles) == sorted(f"task {i}" for i in range(1, 1204))


def _comparable(export: str) -> list[dict[str, object]]:
    """An export without what a restore makes new: etags and times."""
    tasks = [json.loads(line) for line in export.splitlines()]
    for t in tasks:
        for key in ("etag", "create_time", "update_time"):
            t.pop(key)
    return sorted(tasks, key=lambda t: str(t["name"]))


async def test_export_then_import_is_an_exact_round_trip(
    running: Running, tmp_path: Path, empty: Running
) -> None:
    """Into an empty store: the same ids, states and fields. Again: nothing
    created, nothing changed. After an interrupted run: finished, no duplicate."""
    states = [pb.Task.STATE_OPEN, pb.Task.STATE_IN_PROGRESS, pb.Task.STATE_DONE, 4]
    made = [
        task
        for chunk in range(0, 620, 310)
        for task in (
            await running.stub.BatchCreateTasks(
                stream_of(
                    [
                        create_request(
                            f"task {i}",
                            description=f"line one\nline {i}" if i % 3 else "",
                            priority=1 + i % 4,
                            tags=[f"t{i % 5}", "café"] if i % 2 else [],
                            **({"assignee": f"p{i}@example.com"} if i % 4 else {}),
                            task_id=f"kept-{i}" if i % 7 == 0 else "",
                        )
                        for i in range(chunk, chunk + 310)
                    ]
                )
            )
        ).tasks
    ]
    for i, task in enumerate(made):
        if states[i % 4] != pb.Task.STATE_OPEN:
            await running.stub.UpdateTask(
                pb.UpdateTaskRequest(task=pb.Task(name=task.name, state=states[i % 4]))
            )
    code, exported, _ = await taskctl(running, "export")
    assert code == 0 and len(exported.splitlines()) == 620
    path = tmp_path / "tasks.jsonl"
    path.write_text(exported)

    # Interrupted: an earlier run created the first 100 (as import does) and
    # stopped before it gave them their states.
    first = [json.loads(line) for line in exported.splitlines()[:100]]
    await empty.stub.BatchCreateTasks(
        stream_of(
            [
                pb.CreateTaskRequest(
                    task=pb.Task(
                        title=t["title"],
                        description=t["description"],
                        priority=t["priority"],
                        tags=t["tags"],
                        **({"assignee": t["assignee"]} if "assignee" in t else {}),
                    ),
                    task_id=t["name"].removeprefix("tasks/"),
                )
                for t in first
            ]
        )
    )
    code, _, err = await taskctl(empty, "import", str(path))
    assert code == 0, err
    assert "created 520, already present 100" in err and "failed 0" in err
    code, restored, _ = await taskctl(empty, "export")
    assert _comparable(restored) == _comparable(exported)

    code, _, err = await taskctl(empty, "import", str(path))
    assert code == 0 and "created 0, already present 620, failed 0" in err
    code, again, _ = await taskctl(empty, "export")
    assert sorted(again.splitlines()) == sorted(restored.splitlines())  # etags too: unchanged


async def test_watch_prints_events_live_and_its_resume_token_on_ctrl_c(running: Running) -> None:
    await running.stub.CreateTask(create_request("already here", task_id="here"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice.cli",
        "watch",
        "--target",
        running.target,
        "--initial",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines = []
    for _ in range(2):  # the initial task, then CURRENT
        lines.append((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
    created = await running.stub.CreateTask(create_request("new one", task_id="new"))
    lines.append((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
    proc.send_signal(signal.SIGINT)
    err = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
    await asyncio.wait_for(proc.wait(), 30)
    assert "ADDED" in lines[0] and "here" in lines[0] and "OPEN" in lines[0]
    assert lines[1].split()[-1] == "CURRENT"
    assert "ADDED" in lines[2] and "new" in lines[2]
    assert proc.returncode in (0, 130)
    assert "Traceback" not in err
    token = err.split("--resume-token ")[1].split()[0]
    # The printed token continues after the last event shown.
    await running.stub.DeleteTask(pb.DeleteTaskRequest(name=created.name))
    code, out, err2 = await taskctl(
        running, "watch", "--resume-token", token, "--json", "--max-events", "1"
    )
    assert code == 0, err2
    event = json.loads(out)
    assert event["type"] == "TYPE_REMOVED" and event["name"] == "tasks/new"
    assert event["removal_reason"] == "REMOVAL_REASON_DELETED"


def _continue_line(err: str) -> str:
    [line] = [x for x in err.splitlines() if "to continue:" in x]
    return line.split("to continue: ", 1)[1]


async def test_watch_continue_line_pasted_as_is_continues_the_watch_after_sigterm(
    running: Running,
) -> None:
    """SIGTERM prints the token as Ctrl-C does, in a command that keeps the
    filter and output flags: run as printed, it continues the same watch."""
    await running.stub.CreateTask(create_request("ops one", task_id="ops-1", tags=["ops"]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice.cli",
        "watch",
        "--target",
        running.target,
        "--filter",
        'tags:"ops"',
        "--initial",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    for _ in range(2):  # ops-1, then CURRENT
        await asyncio.wait_for(proc.stdout.readline(), 30)
    proc.send_signal(signal.SIGTERM)
    err = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
    await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    command = _continue_line(err)
    assert command.startswith("taskctl ") and "--filter" in command and "--json" in command

    await running.stub.CreateTask(create_request("not ops", task_id="other"))
    await running.stub.CreateTask(create_request("ops two", task_id="ops-2", tags=["ops"]))
    pasted = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert pasted.stdout is not None
    first = (await asyncio.wait_for(pasted.stdout.readline(), 30)).decode()
    pasted.send_signal(signal.SIGTERM)
    _, err2 = await asyncio.wait_for(pasted.communicate(), 30)
    assert "belongs to a different filter" not in err2.decode(), err2.decode()
    event = json.loads(first)  # --json kept; the filter kept: "other" never shows
    assert event["type"] == "TYPE_ADDED" and event["name"] == "tasks/ops-2"


async def test_watch_with_a_bad_token_prints_the_error_and_no_continue_line(
    running: Running,
) -> None:
    code, out, err = await taskctl(running, "watch", "--resume-token", "bogus")
    assert code == 1 and out == ""
    assert "to continue" not in err, err
    assert err.startswith("taskctl: INVALID_ARGUMENT") and len(err.splitlines()) == 1, err


@pytest.mark.firestore
async def test_export_piped_into_import_from_stdin_moves_tasks_between_stores(
    tmp_path: Path, emulator: Emulator
) -> None:
    """`taskctl export | taskctl --target other import -`: SQLite to Firestore."""
    source_store = SqliteStore(tmp_path / "source.db")
    target_store = firestore_store(emulator.host)
    source = await start_server(source_store)
    target = await start_server(target_store)
    try:
        await source.stub.BatchCreateTasks(
            stream_of(
                [create_request(f"moved {i}", tags=["move"], priority=1 + i % 4) for i in range(30)]
            )
        )
        done = await source.stub.CreateTask(create_request("finished", task_id="done-one"))
        await source.stub.UpdateTask(
            pb.UpdateTaskRequest(
                task=pb.Task(name=done.name, state=pb.Task.STATE_DONE),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )
        )
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for attempt in ("created 31, already present 0", "created 0, already present 31"):
            pipeline = await asyncio.create_subprocess_exec(
                "bash",
                "-euo",
                "pipefail",
                "-c",
                f"taskctl --target {source.target} export"
                f" | taskctl --target {target.target} import -",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(pipeline.communicate(), 60)
            assert pipeline.returncode == 0, err.decode()
            assert attempt in err.decode() and "failed 0" in err.decode(), err.decode()
        _, exported, _ = await taskctl(source, "export")
        _, imported, _ = await taskctl(target, "export")
        assert _comparable(imported) == _comparable(exported)
        assert len(exported.splitlines()) == 31
    finally:
        for running, store in ((source, source_store), (target, target_store)):
            await running.channel.close()
            await running.server.stop(grace=0)
            await store.close()


async def test_import_dash_with_nothing_on_stdin_creates_nothing(running: Running) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice.cli",
        "--target",
        running.target,
        "import",
        "-",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "created 0, already present 0, failed 0" in err.decode()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
async def test_enum_flags_take_every_unambiguous_spelling(running: Running) -> None:
    for spelling, priority in (("high", "HIGH"), ("CRITICAL", "CRITICAL"), ("PRIORITY_LOW", "LOW")):
        code, out, err = await taskctl(
            running, "create", "spelled", "--priority", spelling, "--field", "priority"
        )
        assert code == 0, err
        assert out.strip() == f"PRIORITY_{priority}"
    await running.stub.CreateTask(create_request("to change", task_id="spell"))
    for spelling, state in (
        ("done", "DONE"),
        ("DONE", "DONE"),
        ("STATE_IN_PROGRESS", "IN_PROGRESS"),
        ("in-progress", "IN_PROGRESS"),
        ("state_cancelled", "CANCELLED"),
        ("Open", "OPEN"),
    ):
        code, out, err = await taskctl(
            running, "update", "spell", "--state", spelling, "--field", "state"
        )
        assert code == 0, f"{spelling}: {err}"
        assert out.strip() == f"STATE_{state}"
    code, _, err = await taskctl(running, "update", "spell", "--state", "finished")
    assert code == 2
    assert "'finished'" in err and "open, in_progress, done, cancelled" in err, err
    assert "STATE_DONE" in err  # says the prefixed spelling works too


async def _taskctl_at(target: str, *args: str) -> tuple[int, str, str, float]:
    started = asyncio.get_running_loop().time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice.cli",
        "--target",
        target,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    elapsed = asyncio.get_running_loop().time() - started
    return proc.returncode, out.decode(), err.decode(), elapsed


async def test_no_server_is_one_quick_line_that_says_what_to_do() -> None:
    nowhere = f"localhost:{free_port()}"
    code, out, err, elapsed = await _taskctl_at(nowhere, "list")
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1, err
    assert nowhere in err and "`taskservice`" in err and "--target" in err, err
    assert elapsed < 2.5, elapsed  # the interpreter's start, then a refused connect


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
async def test_tls_against_a_plaintext_server_is_one_line(running: Running) -> None:
    code, out, err, _ = await _taskctl_at(f"https://{running.target}", "list")
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1, err
    assert "ssl_transport_security" not in err
    assert "TLS" in err and "https://" in err, err
