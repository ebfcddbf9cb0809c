"""generated/ is what scripts/generate_protos.py makes from protos/; the contract lints clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), str(out)],
        check=True,
        capture_output=True,
    )
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    checked_in = {
        p.relative_to(ROOT / "generated"): p.read_bytes()
        for p in (ROOT / "generated" / "tasks").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert fresh.keys() == checked_in.keys(), "run: python scripts/generate_protos.py"
    stale = [str(k) for k in fresh if fresh[k] != checked_in[k]]
    assert not stale, f"generated/ is stale ({stale}); run: python scripts/generate_protos.py"


def _buf() -> str:
    found = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if found is None:
        pytest.fail("buf is not installed; pip install -e '.[dev]'")
    return found


def test_buf_lint_and_format_are_clean() -> None:
    lint = subprocess.run([_buf(), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [_buf(), "format", "--diff", "--exit-code", "protos"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


# The contract as first released (v1 before WatchTasks). Every later change
# must be additive: buf's FILE-level breaking rules against this commit.
RELEASED_CONTRACT = "3cbd1c205746424302d39cfd0f7058b2578fbd1d"


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _last_committed_contract() -> str:
    """The newest commit whose protos/ differ from the working tree's: the
    contract as it stood before the change under test (HEAD's own change
    to it, or one not committed yet)."""
    changed = _git("rev-list", "HEAD", "--", "protos")
    if changed.returncode != 0:
        pytest.fail("the breaking check needs the git history (a full clone): " + changed.stderr)
    for commit in changed.stdout.split():
        for candidate in (commit, f"{commit}^"):
            if _git("diff", "--quiet", candidate, "--", "protos").returncode == 1:
                return _git("rev-parse", candidate).stdout.strip()
    pytest.fail("no earlier contract in the history")


def _released_tree(into: Path, commit: str = RELEASED_CONTRACT) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "buf.yaml", "protos", "third_party"],
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.fail(
            "the breaking check needs the git history (a full clone): "
            + archive.stderr.decode(errors="replace")
        )
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _breaking(workspace: Path, against: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_buf(), "breaking", str(workspace), "--against", str(against)],
        capture_output=True,
        text=True,
    )


def test_contract_changes_since_release_are_additive(tmp_path: Path) -> None:
    released = _released_tree(tmp_path / "released")
    result = _breaking(ROOT, released)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: renaming one released field is a break.
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(ROOT / "buf.yaml", broken)
    for part in ("protos", "third_party"):
        shutil.copytree(ROOT / part, broken / part)
    proto = broken / "protos" / "tasks" / "v1" / "task_service.proto"
    text = proto.read_text()
    assert "string request_id = " in text
    proto.write_text(text.replace("string request_id = ", "string request_key = ", 1))
    result = _breaking(broken, released)
    assert result.returncode != 0 and "request_id" in result.stdout, result.stdout


def test_the_contract_change_under_test_is_wire_compatible(tmp_path: Path) -> None:
    """buf breaking against the contract before the newest change to it, so
    that what was added after the release (WatchTasks) is held as well."""
    before = _last_committed_contract()
    result = _breaking(ROOT, _released_tree(tmp_path / "before", before))
    assert result.returncode == 0, f"against {before}: " + result.stdout + result.stderr


def test_vendored_googleapis_protos_match_the_wheel() -> None:
    import google.api

    wheel = Path(next(iter(google.api.__path__)))
    for vendored in (ROOT / "third_party" / "googleapis" / "google" / "api").glob("*.proto"):
        assert vendored.read_bytes() == (wheel / vendored.name).read_bytes(), vendored.name


def test_every_element_of_the_contract_is_documented() -> None:
    from google.protobuf import descriptor_pb2

    raw = (ROOT / "generated" / "tasks" / "v1" / "task_service_documented.binpb").read_bytes()
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(raw).file
    commented = {
        tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()
    }
    missing = []

    def need(path: tuple[int, ...], what: str) -> None:
        if path not in commented:
            missing.append(what)

    for si, service in enumerate(file.service):
        need((6, si), service.name)
        for mi, method in enumerate(service.method):
            need((6, si, 2, mi), f"{service.name}.{method.name}")

    def message(path: tuple[int, ...], msg: descriptor_pb2.DescriptorProto) -> None:
        need(path, msg.name)
        for fi, fld in enumerate(msg.field):
            need((*path, 2, fi), f"{msg.name}.{fld.name}")
        for ni, nested in enumerate(msg.nested_type):
            message((*path, 3, ni), nested)
        for ei, enum in enumerate(msg.enum_type):
            need((*path, 4, ei), enum.name)
            for vi, value in enumerate(enum.value):
                need((*path, 4, ei, 2, vi), value.name)

    for mi, msg in enumerate(file.message_type):
        message((4, mi), msg)
    assert not missing, f"undocumented: {missing}"


def test_installed_package_exposes_stubs_without_clashing(tmp_path: Path) -> None:
    code = (
        "from tasks.v1 import task_service_pb2, task_service_pb2_grpc\n"
        "import taskservice\n"
        "assert task_service_pb2_grpc.TaskServiceStub\n"
        "print(task_service_pb2.DESCRIPTOR.package)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "tasks.v1"


def test_stubs_distribution_installs_alone(tmp_path: Path) -> None:
    """A caller can pip install generated/ (the tasks-v1 distribution) without
    the server: it needs no taskservice, Firestore or SQLite code."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "generated", source, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(tmp_path / "site"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    installed = sorted(
        p.name for p in (tmp_path / "site").iterdir() if not p.name.endswith("-info")
    )
    assert installed == ["tasks"]
    meta = next((tmp_path / "site").glob("tasks_v1-*.dist-info")) / "METADATA"
    requires = [line for line in meta.read_text().splitlines() if line.startswith("Requires-Dist")]
    assert requires and not any("firestore" in r or "taskservice" in r for r in requires)
    code = "from tasks.v1 import task_service_pb2_grpc; print(task_service_pb2_grpc.__file__)"
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {code}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(tmp_path / "site") in result.stdout
