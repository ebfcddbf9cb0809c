"""Where a TaskService call's time goes: py-spy flame graphs of the server
under h2load, for the targets the benchmark shows as missed or close.

    python -m bench.profile [--out docs/reports/profiles] [--seconds-of-load N]

For each target (the echo ceiling's GetTask, TaskService on SQLite's GetTask
and CreateTask) it starts the server, puts the method under load at 16 in
flight (as the benchmark does), samples the server with py-spy at 250 Hz with
--gil (only the thread holding the GIL, so the graph shows what the
interpreter spends its one core on), and writes OUT/<target>.svg plus
OUT/profiles.md: the top functions by share of samples, self and inclusive.
Needs py-spy (pip install '.[bench]') and h2load; py-spy needs ptrace
permission over the server (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks.v1 import task_service_pb2 as pb

from bench.__main__ import (
    CREATE,
    ROOT,
    create_get_target,
    h2load,
    start_echo,
    start_taskservice,
)

_LINE = re.compile(r":\d+\)$")


def _where(frame: str) -> str:
    """A frame 'fn (file.py:line)' as 'fn (file.py)': lines of a function merged."""
    return _LINE.sub(")", frame)


def summarize(raw: Path, top: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(self, inclusive) shares of samples per function from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_where(f) for f in stack.split(";")[1:]]  # [0] is the thread
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    total = max(total, 1)
    return (
        [(f, c / total) for f, c in own.most_common(top)],
        [(f, c / total) for f, c in inclusive.most_common(top + 10)],
    )


def profile(target: str, out: Path, calls: int, workdir: Path) -> dict[str, Any]:
    """target: "echo-GetTask" (the ceiling), "sqlite-GetTask" or "sqlite-CreateTask"."""
    server_kind, method = target.split("-")
    server = start_echo() if server_kind == "echo" else start_taskservice("sqlite", workdir, None)
    try:
        request: Any = pb.GetTaskRequest(name="tasks/x")
        if method == "CreateTask":
            request = CREATE
        elif server_kind == "sqlite":
            request = pb.GetTaskRequest(name=create_get_target(server).name)
        h2load(server, method, request, 16, 1000)  # warm
        results = {}
        for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            path = (out if fmt == "flamegraph" else workdir) / f"{target}.{suffix}"
            command = ["py-spy", "record", "--gil", "-r", "250", "--format", fmt]
            spy = subprocess.Popen(
                [*command, "-o", str(path), "--pid", str(server.proc.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)  # py-spy attached
            results[fmt] = h2load(server, method, request, 16, calls)
            spy.send_signal(signal.SIGINT)
            _, err = spy.communicate(timeout=60)
            if not path.exists():
                raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-500:]}")
            if fmt == "flamegraph":  # its title names the output path: not this machine's
                path.write_text(path.read_text().replace(str(path), path.name))
        own, inclusive = summarize(workdir / f"{target}.txt")
        return {"load": results["raw"], "self": own, "inclusive": inclusive}
    finally:
        server.stop()


def write_markdown(found: dict[str, dict[str, Any]], out: Path) -> None:
    lines = [
        "# Profiles",
        "",
        "`python -m bench.profile`: the echo ceiling and TaskService on SQLite under h2load",
        "at 16 in flight, each sampled by py-spy at 250 Hz with `--gil` (only the thread",
        "holding the GIL: what the one interpreter core is spent on). Calls/s are lower than",
        "in benchmarks.md: the sampler shares the two cores.",
        "",
        "How to read them: `Handle._run` *self* time is C code the event loop runs that",
        "py-spy cannot see into: grpc's Cython core (reading, parsing and writing HTTP/2",
        "frames, completing calls) and asyncio's C task steps. The echo pays that too;",
        "what a TaskService call adds on top is under `_unary.<locals>.handle`",
        "(taskservice/api/calls.py: decoding, the servicer, the access line).",
        "",
        "Flame graphs: " + ", ".join(f"[{t}]({t}.svg)" for t in found) + ".",
    ]
    for target, f in found.items():
        load = f["load"]
        lines += [
            "",
            f"## {target}",
            "",
            f"{load['calls_per_s']:.0f} calls/s, server CPU {load['server_cpu_us_per_call']:.0f}"
            " µs per call while sampled.",
            "",
            "| self | function | | inclusive | function |",
            "| --- | --- | --- | --- | --- |",
        ]
        rows = max(len(f["self"]), len(f["inclusive"]))
        for i in range(rows):
            s = f["self"][i] if i < len(f["self"]) else ("", 0.0)
            n = f["inclusive"][i] if i < len(f["inclusive"]) else ("", 0.0)
            left = f"{s[1]:.1%} | `{s[0]}`" if s[0] else " | "
            lines.append(f"| {left} | | {n[1]:.1%} | `{n[0]}` |")
    (out / "profiles.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reports" / "profiles"))
    parser.add_argument("--calls", type=int, default=8000)
    parser.add_argument(
        "targets", nargs="*", default=["echo-GetTask", "sqlite-GetTask", "sqlite-CreateTask"]
    )
    args = parser.parse_args()
    for tool in ("py-spy", "h2load"):
        if shutil.which(tool) is None:
            print(f"bench.profile: {tool} not found", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            found[target] = profile(target, out, args.calls, Path(tmp))
            print(f"{target}: {found[target]['load']}", flush=True)
    write_markdown(found, out)
    print(f"wrote {out / 'profiles.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
