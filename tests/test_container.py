"""Container smoke test: build the image, run it against the Firestore emulator,
health + a CRUD round trip through grpcurl, then `podman stop -t 10` exits
cleanly well inside Cloud Run's 10 s.

Selected with `-m container`; skipped with a clear reason where podman cannot
run or the local base image cannot be prepared.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Emulator, free_port
from tests.helpers import json_lines, loud_skip
from tests.readme_blocks import readme_blocks, run_block

# Preparing the base image and building may take up to 20 minutes each on a
# cold machine (their own subprocess timeouts); past that a test is hung.
pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(2700)]
ROOT = Path(__file__).resolve().parent.parent
BASE_TOOL = ROOT.parent / "shared" / "tools" / "container-base.sh"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; pip install -e '.[dev]'")
    return found


@pytest.fixture(scope="module")
def container_env() -> dict[str, str]:
    if not BASE_TOOL.is_file():
        loud_skip(
            f"CONTAINER TESTS SKIPPED: {BASE_TOOL} (local python:3.11-slim stand-in) is absent"
        )
    prepared = subprocess.run(
        ["bash", str(BASE_TOOL)], capture_output=True, text=True, timeout=1200
    )
    if prepared.returncode != 0:
        last = (prepared.stderr.strip().splitlines() or ["?"])[-1]
        loud_skip(f"CONTAINER TESTS SKIPPED: cannot prepare podman/buildah here: {last}")
    env = dict(__import__("os").environ)
    for line in prepared.stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
    info = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True)
    if info.returncode != 0:
        loud_skip(f"CONTAINER TESTS SKIPPED: podman cannot run here: {info.stderr.strip()[-200:]}")
    return env


def _inspect(env: dict[str, str], kind: str, template: str, name: str) -> str:
    """One field of a podman image or container, by Go template."""
    return subprocess.run(
        ["podman", kind, "inspect", "-f", template, name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def image(container_env: dict[str, str]) -> Iterator[str]:
    tag = f"localhost/taskservice:smoke-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    # podman build keeps its layers, so the README's own `docker build` (run
    # below with podman) reuses them instead of building everything again.
    build = subprocess.run(
        ["podman", "build", "--pull=never", "-t", tag, str(ROOT)],
        env=container_env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size = _inspect(container_env, "image", "{{.Size}}", tag)
    print(f"\nimage {tag}: built in {time.monotonic() - started:.1f} s, {int(size) / 1e6:.0f} MB")
    yield tag
    subprocess.run(["podman", "rmi", "-f", tag], env=container_env, capture_output=True)


def test_image_serves_and_stops_cleanly(
    container_env: dict[str, str], image: str, emulator: Emulator
) -> None:
    env = container_env
    user = _inspect(env, "image", "{{.Config.User}}", image)
    assert user not in ("", "0", "root")
    port = free_port()
    name = f"taskservice-smoke-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        [
            "podman",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "-e",
            f"PORT={port}",
            "-e",
            f"FIRESTORE_EMULATOR_HOST={emulator.host}",
            "-e",
            "GOOGLE_CLOUD_PROJECT=demo-container",
            image,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    grpcurl = _tool("grpcurl")
    target = f"127.0.0.1:{port}"

    def call(method: str, body: str | None = None) -> dict[str, object]:
        args = [grpcurl, "-plaintext", "-max-time", "5"]
        if body is not None:
            args += ["-d", body]
        result = subprocess.run([*args, target, method], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout or "{}")  # type: ignore[no-any-return]

    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [grpcurl, "-plaintext", "-max-time", "2", target, "grpc.health.v1.Health/Check"],
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0 and json.loads(probe.stdout)["status"] == "SERVING":
                status = "SERVING"
                break
            time.sleep(0.2)
        assert status == "SERVING", "the container never became SERVING"

        created = call(
            "tasks.v1.TaskService/CreateTask", '{"task": {"title": "from the container"}}'
        )
        got = call("tasks.v1.TaskService/GetTask", json.dumps({"name": created["name"]}))
        assert got == created
        updated = call(
            "tasks.v1.TaskService/UpdateTask",
            json.dumps(
                {"task": {"name": created["name"], "state": "STATE_DONE", "etag": created["etag"]}}
            ),
        )
        assert updated["state"] == "STATE_DONE"
        call("tasks.v1.TaskService/DeleteTask", json.dumps({"name": created["name"]}))

        started = time.monotonic()
        stop = subprocess.run(
            ["podman", "stop", "-t", "10", name], env=env, capture_output=True, text=True
        )
        stopped_in = time.monotonic() - started
        assert stop.returncode == 0, stop.stderr
        code = _inspect(env, "container", "{{.State.ExitCode}}", name)
        print(f"podman stop took {stopped_in:.2f} s, exit code {code}")
        assert code == "0"
        assert stopped_in < 5
        logs = subprocess.run(
            ["podman", "logs", name], env=env, capture_output=True, text=True
        ).stderr
        entries = json_lines(logs)
        assert {"firestore"} == {e["store"] for e in entries if "store" in e}
        assert any(e["message"] == "stopped" for e in entries)
    finally:
        subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True)


def _readme_block_runs(
    container_env: dict[str, str], kind: str, tmp_path: Path, emulator: str | None = None
) -> None:
    """A README container example, as written, with podman standing in for
    docker where docker cannot run (README: `alias docker=podman`)."""
    [block] = readme_blocks(kind)
    docker_works = (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )
    prelude = "" if docker_works else 'docker() { podman "$@"; }\n'
    names = ("taskservice", "taskservice-fs")
    runtime = "docker" if docker_works else "podman"
    for name in names:
        subprocess.run([runtime, "rm", "-f", name], env=container_env, capture_output=True)
    try:
        result = run_block(
            block,
            port=free_port(),
            cwd=ROOT,
            emulator=emulator,
            prelude=prelude,
            env=container_env,
            timeout=600,
        )
        assert result.returncode == 0, (
            f"{block.where} failed:\n{block.text}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
    finally:
        for name in names:
            subprocess.run([runtime, "rm", "-f", name], env=container_env, capture_output=True)
        subprocess.run(
            [runtime, "volume", "rm", "-f", "taskservice-data"],
            env=container_env,
            capture_output=True,
        )


def test_the_readme_sqlite_container_example_works(
    container_env: dict[str, str], image: str, tmp_path: Path
) -> None:
    _readme_block_runs(container_env, "container", tmp_path)


def test_the_readme_emulator_container_example_works(
    container_env: dict[str, str], image: str, tmp_path: Path, emulator: Emulator
) -> None:
    _readme_block_runs(container_env, "container-emulator", tmp_path, emulator.host)


def test_the_image_without_credentials_says_what_to_do(
    container_env: dict[str, str], image: str
) -> None:
    """README before: a 30-line traceback ending in DefaultCredentialsError."""
    result = subprocess.run(
        ["podman", "run", "--rm", "-e", "GOOGLE_CLOUD_PROJECT=my-project", image],
        env=container_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "GOOGLE_APPLICATION_CREDENTIALS" in lines[0] and "TASKSERVICE_STORE=sqlite" in lines[0]
