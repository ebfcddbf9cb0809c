"""The runnable shell examples of the README and docs/, and how to run one
as written.

A fenced ```sh block right after a `<!-- readme-test: KIND -->` line is an
example that must work as written (KIND: local, container, container-emulator,
emulator). The only changes a test makes are the ones a reader's machine
would: the ports (8080 for the server, 8081 for an emulator) become free
ones, and TASKCTL_TARGET points taskctl at that server. An `emulator` block
is commands that run until stopped, one per terminal: `start_each_line`
starts each, as a terminal would, in a session of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"<!-- readme-test: ([a-z-]+) -->\n```sh\n(.*?)```", re.DOTALL)


# Where the examples are, in the order a reader meets them (the README, then
# the docs it points to).
DOCUMENTS = (
    "README.md",
    "docs/api.md",
    "docs/taskctl.md",
    "docs/operations.md",
    "docs/architecture.md",
)


@dataclass(frozen=True)
class Block:
    kind: str
    text: str
    document: str  # its path in the repository
    line: int  # in that document

    @property
    def where(self) -> str:
        return f"{self.document} line {self.line}"


def readme_blocks(kind: str) -> list[Block]:
    """Every example of `kind` in DOCUMENTS, in order."""
    found = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        found += [
            Block(m.group(1), m.group(2), document, text[: m.start()].count("\n") + 1)
            for m in _BLOCK.finditer(text)
            if m.group(1) == kind
        ]
    return found


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
    full = _environment(env, port)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", prelude + text],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _environment(env: dict[str, str] | None, port: int) -> dict[str, str]:
    return {
        **os.environ,
        **(env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TASKCTL_TARGET": f"localhost:{port}",
    }


@dataclass
class Started:
    """The commands of a block, each running in a session of its own."""

    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def output(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs)

    def stop(self) -> list[int]:
        """SIGINT to each session, as Ctrl-C in its terminal; SIGKILL to the
        whole session after 15 s. The exit codes, in block order."""
        for p in self.processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        codes = []
        for p in self.processes:
            try:
                codes.append(p.wait(15))
            except subprocess.TimeoutExpired:
                codes.append(-9)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # what a command left behind
        return codes


def start_each_line(
    block: Block, *, port: int, emulator: str, cwd: Path, env: dict[str, str] | None = None
) -> Started:
    """Starts each command line of the block in its own session (comments
    and blank lines skipped), as the reader does in one terminal each; the
    server's port is `port` (PORT, since the block relies on the default)."""
    started = Started([], [])
    for number, line in enumerate(block.text.splitlines()):
        command = line.split("#", 1)[0].strip() if "#" in line else line.strip()
        if not command:
            continue
        command = command.replace("127.0.0.1:8081", emulator)
        shlex.split(command)  # a line is one whole command
        log = cwd / f"readme-line-{block.line + number}.log"
        with log.open("wb") as out:
            started.processes.append(
                subprocess.Popen(
                    ["bash", "-c", command],
                    cwd=cwd,
                    env={**_environment(env, port), "PORT": str(port)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        started.logs.append(log)
    return started
