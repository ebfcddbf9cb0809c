"""taskctl, run as a process against a real server."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tasks.v1 import task_service_pb2 as pb

from tests.conftest import Running


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
    assert header.split() == ["NAME", "TITLE", "STATE", "PRIORITY", "ASSIGNEE", "TAGS", "UPDATED"]
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
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["tasks/runbook"]

    code, out, _ = await taskctl(running, "delete", "runbook")
    assert code == 0 and "deleted tasks/runbook" in out
    code, _, err = await taskctl(running, "get", "runbook")
    assert code == 1 and "NOT_FOUND" in err


async def test_import_reports_bad_lines_and_keeps_chunks_atomic(
    running: Running, tmp_path: Path
) -> None:
    lines = [json.dumps({"title": f"task {i}", "tags": ["imported"]}) for i in range(1, 1204)]
    lines[699] = "{not json"  # line 700
    lines[1099] = json.dumps({"task": {"title": ""}})  # line 1100, rejected by the server
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = await taskctl(running, "import", str(path))
    assert code == 1
    assert "line 700:" in err and "line 1100" in err and "task.title" in err
    assert "nothing from lines 501-1000 was written" in err
    assert "nothing from lines 1001-1203 was written" in err
    assert "imported 500 tasks; 703 lines not written" in err
    listed = await running.stub.ListTasks(
        pb.ListTasksRequest(page_size=200, filter='tags:"imported"')
    )
    assert len(listed.tasks) == 200 and listed.next_page_token

    # Fix the file and import again: the first 500 are not created twice.
    lines[699] = json.dumps({"title": "task 700", "tags": ["imported"]})
    lines[1099] = json.dumps({"title": "task 1100", "tags": ["imported"]})
    path.write_text("\n".join(lines) + "\n")
    code, _, err = await taskctl(running, "import", str(path))
    assert code == 0, err
    code, out, _ = await taskctl(running, "export", "--filter", 'tags:"imported"')
    titles = [json.loads(line)["title"] for line in out.splitlines()]
    assert sorted(titles) == sorted(f"task {i}" for i in range(1, 1204))

    code, _, err = await taskctl(running, "import", str(path))
    assert code == 0 and "imported 1203 tasks" in err  # the existing tasks, returned again
    code, out, _ = await taskctl(running, "export", "--filter", 'tags:"imported"')
    assert len(out.splitlines()) == 1203
