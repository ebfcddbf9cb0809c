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
import tempfile
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


_THREAD_HEAP = 64 << 20  # glibc's HEAP_MAX_SIZE: a thread arena's heaps are aligned to it


def resident_by_kind() -> dict[str, float]:
    """VmRSS split by what the mappings hold (MB): `heap` (glibc's main arena),
    `thread_arenas` (glibc's other arenas: anonymous mappings aligned to 64
    MiB), `small_anon` (anonymous mappings of at most 1 MiB: Python's object
    arenas, thread stacks' guard neighbours), `other_anon` (larger anonymous
    mappings: big allocations, thread stacks) and `files` (code and data of
    the interpreter and the libraries)."""
    kinds: dict[str, float] = dict.fromkeys(
        ("heap", "thread_arenas", "small_anon", "other_anon", "files"), 0.0
    )
    kind = "files"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            name = head[5] if len(head) > 5 else ""
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("/"):
                kind = "files"
            elif name:
                kind = "other_anon"  # [stack], [vvar] and the like
            elif start % _THREAD_HEAP == 0:
                kind = "thread_arenas"
            elif end - start <= 1 << 20:
                kind = "small_anon"
            else:
                kind = "other_anon"
        elif head[0] == "Rss:":
            kinds[kind] += int(head[1]) / 1024
    return {k: round(v, 1) for k, v in kinds.items()}


def python_allocator() -> dict[str, float]:
    """pymalloc's own account (sys._debugmallocstats, which prints to fd 2;
    the log lines written meanwhile are passed on to the real stderr, so ask
    while no calls are being served, or lines may be cut): its
    arenas (MB resident at most), the bytes in objects, free inside them."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        for line in capture.read().decode(errors="replace").splitlines():
            if line.startswith("{"):  # a log line written meanwhile
                os.write(2, (line + "\n").encode())
            key, _, value = line.partition("=")
            number = value.strip().replace(",", "")
            if not number.isdigit():
                continue
            if key.startswith("# arenas allocated current"):
                figures["arenas_mb"] = int(number) * 1.0  # 1 MiB arenas
            elif key.startswith("# arenas highwater mark"):
                figures["arenas_highwater_mb"] = int(number) * 1.0
            elif key.startswith("# bytes in allocated blocks"):
                figures["in_objects_mb"] = round(int(number) / 2**20, 1)
            elif key.startswith("# bytes in available blocks"):
                figures["free_in_arenas_mb"] = round(int(number) / 2**20, 1)
    return figures


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
    found["resident_mb"] = resident_by_kind()
    found["pymalloc"] = python_allocator()
    if trim and libc is not None:
        libc.malloc_trim(0)
        found["rss_mb_after_trim"] = round(_rss_mb(), 1)
        found["resident_mb_after_trim"] = resident_by_kind()
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
