"""The README's runnable shell examples, and how to run one as written.

A fenced ```sh block right after a `<!-- readme-test: KIND -->` line is an
example that must work as written (KIND: local, container, container-emulator).
The only changes a test makes are the ones a reader's machine would: the
ports (8080 for the server, 8081 for an emulator) become free ones, and
TASKCTL_TARGET points taskctl at that server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"<!-- readme-test: ([a-z-]+) -->\n```sh\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Block:
    kind: str
    text: str
    line: int  # in README.md


def readme_blocks(kind: str) -> list[Block]:
    readme = (ROOT / "README.md").read_text()
    return [
        Block(m.group(1), m.group(2), readme[: m.start()].count("\n") + 1)
        for m in _BLOCK.finditer(readme)
        if m.group(1) == kind
    ]


def run_block(
    block: Block,
    *,
    port: int,
    cwd: Path,
    emulator: str | None = None,
    prelude: str = "",
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """Runs a block in a fresh `bash -euo pipefail`, with the virtualenv's
    bin directory first on PATH (as `. .venv/bin/activate` does)."""
    text = block.text.replace("localhost:8080", f"localhost:{port}")
    text = text.replace("-p 8080:8080", f"-p {port}:8080").replace("PORT=8080", f"PORT={port}")
    if emulator is not None:
        text = text.replace("127.0.0.1:8081", emulator)
    full = {
        **os.environ,
        **(env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TASKCTL_TARGET": f"localhost:{port}",
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", prelude + text],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
