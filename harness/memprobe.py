"""A memory probe for server processes under test: where the resident memory
of a TaskService process sits, asked from outside while it serves.

`python -m harness.memprobe` runs `python -m taskservice` unchanged, plus one
daemon thread that watches TASKSERVICE_MEMPROBE_DIR for requests (a file
`<name>.req` whose text is `measure` or `trim`) and answers each in
`<name>.json`: Python's own view (sys.getallocatedblocks(), the objects the
collector tracks, tracemalloc's figures when PYTHONTRACEMALLOC is set), glibc's
(mallinfo2: bytes in use, bytes free but held), and, for `trim`, VmRSS before
and after malloc_trim(0), which hands free heap pages back to the kernel.
Memory that trimming returns was freed by the program and kept by the
allocator; memory that Python still counts as allocated was not freed.

probe() is the test side: it writes a request and waits for the answer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

_DIR_SETTING = "TASKSERVICE_MEMPROBE_DIR"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(trim: bool) -> dict[str, Any]:
    """The process's memory as Python and glibc see it (trim: malloc_trim(0)
    first, with VmRSS on either side)."""
    found: dict[str, Any] = {
        "rss_mb": round(_rss_mb(), 1),
        "python_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
        "threads": threading.active_count(),
    }
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        found["tracemalloc_mb"] = round(current / 2**20, 1)
        found["tracemalloc_peak_mb"] = round(peak / 2**20, 1)
        top = tracemalloc.take_snapshot().statistics("lineno")[:8]
        found["tracemalloc_top"] = [f"{s.size / 2**20:.2f} MB {s.traceback}" for s in top]
    libc = _libc()
    if libc is not None and hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
        found["malloc_in_use_mb"] = round((info.uordblks + info.hblkhd) / 2**20, 1)
        found["malloc_free_held_mb"] = round(info.fordblks / 2**20, 1)
        found["malloc_arena_mb"] = round(info.arena / 2**20, 1)
    if trim and libc is not None:
        libc.malloc_trim(0)
        found["rss_mb_after_trim"] = round(_rss_mb(), 1)
    return found


def _serve_requests(directory: Path) -> None:
    while True:
        for request in sorted(directory.glob("*.req")):
            kind = request.read_text().strip()
            answer = measure(trim=kind == "trim")
            partial = request.with_suffix(".part")
            partial.write_text(json.dumps(answer))
            partial.rename(request.with_suffix(".json"))
            request.unlink()
        time.sleep(0.1)


def probe(directory: Path, kind: str = "measure", timeout: float = 10.0) -> dict[str, Any]:
    """Asks the server process started with TASKSERVICE_MEMPROBE_DIR=directory
    for its memory figures (kind `measure` or `trim`)."""
    name = f"{time.monotonic_ns()}"
    answer = directory / f"{name}.json"
    (directory / f"{name}.tmp").write_text(kind)
    (directory / f"{name}.tmp").rename(directory / f"{name}.req")
    deadline = time.monotonic() + timeout
    while not answer.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no memory probe answer in {timeout} s")
        time.sleep(0.05)
    found: dict[str, Any] = json.loads(answer.read_text())
    answer.unlink()
    return found


def main() -> None:
    directory = os.environ.get(_DIR_SETTING)
    if directory:
        threading.Thread(
            target=_serve_requests, args=(Path(directory),), name="memprobe", daemon=True
        ).start()
    sys.argv[0] = "taskservice"
    runpy.run_module("taskservice", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
