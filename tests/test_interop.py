"""Clients written by others, against a real server on each store: Node's
@grpc/grpc-js (interop/node/suite.js) at default settings. Where Node or npm
is missing the suite is skipped with a red banner at the end of the run."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from tasks.v1 import task_service_pb2 as pb

from harness import Running
from tests.helpers import loud_skip
from tests.reliability import record

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "interop" / "node"


def proto_include_dirs() -> list[str]:
    """protos/, the vendored google/api files, google/rpc from the
    googleapis-common-protos wheel and google/protobuf from grpcio-tools."""
    import google.rpc
    import grpc_tools

    rpc_root = Path(next(iter(google.rpc.__path__))).parent.parent
    return [
        str(ROOT / "protos"),
        str(ROOT / "third_party" / "googleapis"),
        str(rpc_root),
        str(Path(grpc_tools.__file__).parent / "_proto"),
    ]


@pytest.fixture(scope="session")
def node_suite() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        loud_skip("NODE INTEROP TESTS SKIPPED: node/npm not found (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        installed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if installed.returncode != 0:
            loud_skip(f"NODE INTEROP TESTS SKIPPED: npm ci failed: {installed.stderr[-300:]}")
    return NODE_DIR / "suite.js"


async def _count(running: Running, tag: str) -> int:
    total, token = 0, ""
    while True:
        page = await running.stub.ListTasks(
            pb.ListTasksRequest(filter=f'tags:"{tag}"', page_size=200, page_token=token)
        )
        total += len(page.tasks)
        token = page.next_page_token
        if not token:
            return total


async def test_grpc_js_suite(running: Running, node_suite: Path) -> None:
    import asyncio

    run = uuid.uuid4().hex[:8]
    args = ["node", str(node_suite), "--target", running.target, "--run", run]
    for include in proto_include_dirs():
        args += ["--include", include]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()[-2000:]
    results: dict[str, dict[str, Any]] = {}
    for line in out.decode().splitlines():
        entry = json.loads(line)
        results[entry["check"]] = entry
    failed = {name: r["error"] for name, r in results.items() if not r["ok"]}
    assert not failed, failed
    assert len(results) == 8
    # What the calls left behind, counted on the server.
    await asyncio.sleep(0.5)
    written = {
        tag: await _count(running, f"{tag}-{run}")
        for tag in ("batch", "over", "deadline", "cancel", "big", "fits", "crud")
    }
    record(
        "interop_grpc_js",
        store=running.server.store.kind,
        checks=len(results),
        cancelled_batches=40,
        cancelled_written=written["cancel"],
        default_limit=results["defaultLimitBatch"],
        written=written,
    )
    assert written == {
        "batch": 500,
        "over": 0,
        "deadline": 0,
        "cancel": 0,
        "big": 0,
        "fits": results["defaultLimitBatch"]["largest_received"],
        "crud": 0,
    }


async def test_a_grpc_js_watcher_that_pauses_past_the_grace_gets_its_resume_token(
    tmp_path: Path, node_suite: Path
) -> None:
    """grpc-js call.pause() for 4 s while updates commit: the server ends the
    stream WATCHER_TOO_SLOW; when the caller reads again it gets every event
    sent, then the status, whose resume_token is the last event's (it used
    to come without one once the pause outlasted the server's grace)."""
    import asyncio

    from harness import start_server
    from taskservice.config import Config
    from taskservice.store.sqlite import SqliteStore
    from tests.helpers import create_request

    running = await start_server(
        SqliteStore(tmp_path / "t.db"), Config(host="127.0.0.1", port=0, watch_buffer=20)
    )
    try:
        task = await running.stub.CreateTask(create_request("big", description="d" * 2000))
        args = ["node", str(node_suite.parent / "paused_watch.js"), "--target", running.target]
        args += ["--pause-ms", "4000"]
        for include in proto_include_dirs():
            args += ["--include", include]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(first) == {"paused": True}
        for i in range(300):
            await running.stub.UpdateTask(
                pb.UpdateTaskRequest(task=pb.Task(name=task.name, title=f"v{i}"))
            )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert result["code"] == 8, (result, err.decode()[-1000:])  # RESOURCE_EXHAUSTED
        assert result["reason"] == "WATCHER_TOO_SLOW"
        assert result["metadata"].get("resume_token") == result["last_token"] != ""
        record("interop_grpc_js_paused_watch", events_before_status=result["events"])
    finally:
        await running.close()
