"""An executable README: every local shell example, run as written against a
real server, twice in a row (the container examples run in
tests/test_container.py)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import FAST_RECONNECT, ServerProcess, emulator_jar, free_port
from tests.helpers import loud_skip
from tests.readme_blocks import readme_blocks, run_block, start_each_line

# What legitimately differs between two runs of the same example: times,
# etags, opaque tokens (resume and page tokens), and who noticed a passed
# deadline first (grpcurl's own "context deadline exceeded", or the server's
# DEADLINE_EXCEEDED status arriving a moment before it).
_VOLATILE = [
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?Z?"), "<TIME>"),
    (re.compile(r"\b[0-9a-f]{16}\b"), "<ETAG>"),
    (re.compile(r"[A-Za-z0-9_-]{32,}"), "<TOKEN>"),
    (re.compile(r"Message: (context deadline exceeded|Deadline Exceeded)"), "Message: <DEADLINE>"),
]


def _normalized(text: str) -> str:
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return text


def test_the_readme_has_runnable_examples() -> None:
    assert len(readme_blocks("local")) >= 8
    assert len(readme_blocks("container")) == 1
    assert len(readme_blocks("container-emulator")) == 1
    assert len(readme_blocks("emulator")) == 1


def test_every_local_readme_example_works_as_written_twice(tmp_path: Path) -> None:
    """In README order, each block in a fresh shell, against one server; then
    all of them again, with the same results (times, etags and tokens aside)."""
    server = ServerProcess({"TASKSERVICE_SQLITE_PATH": str(tmp_path / "tasks.db")}, tmp_path)
    outputs: list[list[str]] = []
    try:
        for attempt in ("first", "second"):
            outputs.append([])
            for block in readme_blocks("local"):
                result = run_block(block, port=server.port, cwd=tmp_path)
                assert result.returncode == 0, (
                    f"{block.where} failed on its {attempt} run:\n{block.text}\n"
                    f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
                )
                outputs[-1].append(_normalized(result.stdout + result.stderr))
    finally:
        code, err = server.stop()
    assert code == 0, err
    for block, first, second in zip(readme_blocks("local"), *outputs, strict=True):
        assert first == second, f"{block.where} gave another result the second time"
    [watch] = [
        o
        for b, o in zip(readme_blocks("local"), outputs[0], strict=True)
        if "taskctl watch" in b.text
    ]
    events = [line.split()[1] for line in watch.splitlines() if line.startswith("<TIME>")]
    assert events == ["ADDED", "CURRENT"], watch  # as its comment says: the task, then CURRENT


def _serving(target: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=FAST_RECONNECT) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


def test_the_two_emulator_commands_serve_every_local_example(tmp_path: Path) -> None:
    """The emulator and the server, started as the README's two commands,
    then every local example against them."""
    if shutil.which("gcloud") is None or emulator_jar() is None:
        loud_skip(
            "README EMULATOR TEST SKIPPED: gcloud or the Cloud Firestore emulator is not"
            " installed; the README's emulator commands did NOT run"
        )
    [block] = readme_blocks("emulator")
    port = free_port()
    started = start_each_line(block, port=port, emulator=f"127.0.0.1:{free_port()}", cwd=tmp_path)
    try:
        assert _serving(f"127.0.0.1:{port}", 90), started.output()
        for example in readme_blocks("local"):
            result = run_block(example, port=port, cwd=tmp_path)
            assert result.returncode == 0, (
                f"{example.where} failed against the emulator:\n{example.text}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
    finally:
        codes = started.stop()
    output = started.output()
    assert "Firestore project demo-taskservice" in output, output
    assert codes[1] == 0, output  # the server drained and stopped cleanly on Ctrl-C
    assert not (tmp_path / "tasks.db").exists()
