"""An executable README: every local shell example, run as written against a
real server (the container examples run in tests/test_container.py)."""

from __future__ import annotations

from pathlib import Path

from harness import ServerProcess
from tests.readme_blocks import readme_blocks, run_block


def test_the_readme_has_runnable_examples() -> None:
    assert len(readme_blocks("local")) >= 8
    assert len(readme_blocks("container")) == 1
    assert len(readme_blocks("container-emulator")) == 1


def test_every_local_readme_example_works_as_written(tmp_path: Path) -> None:
    """In README order, each block in a fresh shell, against one server."""
    server = ServerProcess({"TASKSERVICE_SQLITE_PATH": str(tmp_path / "tasks.db")}, tmp_path)
    try:
        for block in readme_blocks("local"):
            result = run_block(block, port=server.port, cwd=tmp_path)
            assert result.returncode == 0, (
                f"README.md line {block.line} failed:\n{block.text}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
    finally:
        code, err = server.stop()
    assert code == 0, err
