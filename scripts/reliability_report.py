"""Runs the fault, load and fuzz tests and writes docs/reports/reliability.md from their figures.

Usage: python scripts/reliability_report.py [--soak-seconds 60] [--fuzz-examples 300]
                                          [--scaleout-seconds 90] [--hostile-soak-seconds 180]
                                          [--only tests/test_x.py ...]

Every figure in the report is what this run measured; a failing test makes
the command fail (the report is still written, marked FAILED). --only runs
just the named test files and replaces just the rows they record, in place,
leaving the rest of the report as it was, with a line saying which rows came
from which run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_faults.py",
    "tests/test_outages.py",
    "tests/test_slow_clients.py",
    "tests/test_soak.py",
    "tests/test_fuzz.py",
    "tests/test_hostile.py",
    "tests/test_drain.py",
    "tests/test_interop.py",
    "tests/test_workers.py",
    "tests/test_scaleout.py",
    "tests/test_hostile_soak.py",
]
WHAT = {
    "frozen_backend": "Firestore emulator frozen (SIGSTOP) for 6 s under 16 writers, then SIGCONT",
    "sigterm_under_load": "SIGTERM with 64 calls in flight (creates, updates, batch streams)",
    "sigterm_under_load_descheduled": "the same, the server given no CPU (SIGSTOP) for 0.5 s"
    " from the SIGTERM, as on a loaded machine",
    "sqlite_sigkill": "SIGKILL of the SQLite server under 16 writers, then restart",
    "stalled_streams": "50 batch streams send one message and stall; GetTask latency meanwhile",
    "soak_sqlite": "64 mixed callers (create/get/list/update/delete/batch/etag races), SQLite",
    "soak_firestore": "the same 64 mixed callers on the Firestore emulator",
    "fuzz": "hypothesis over every RPC's fields (arbitrary text and values that pass the"
    " syntax checks: well-formed etags, minted page tokens, valid ids), plus raw bytes",
    "cancelled_batches": "40 batch streams ended with END_STREAM then RST_STREAM(CANCEL), raw"
    " HTTP/2, the reset `gap_s` behind; `written` counts batches stored",
    "bad_mask_status": "UpdateTask with `paths` bad update_mask paths (63 KB at 21,000): size"
    " of the status the caller gets",
    "bad_masks_in_flight": "GetTask p50 while 4 callers send 21,000-path masks nonstop",
    "drain_with_open_streams": "SIGTERM with health Watch and reflection streams open",
    "soak_sqlite_2_workers": "the same 64 callers, SQLite, TASKSERVICE_WORKERS=2 (two"
    " processes writing one file)",
    "soak_firestore_2_workers": "the same 64 callers, Firestore emulator, TASKSERVICE_WORKERS=2",
    "scaleout_round_robin": "3 instances on one emulator project, 64 callers through gRPC"
    " round_robin, crossing instances on purpose (a request_id retried on another instance"
    " while in flight, etag races from two instances, pages from different instances,"
    " batches to each), and a rolling restart (each instance SIGTERMed and replaced);"
    " `rolled`: (instance, exit code, drained s, back s)",
    "scaleout_nginx": "the same through nginx as Cloud Run's front end",
    "workers_share_the_port": "TASKSERVICE_WORKERS=2: CPU seconds each worker used under"
    " 16 connections",
    "worker_restart": "a worker SIGKILLed: health NOT_SERVING until its replacement is ready",
    "workers_log_lines": "2 workers' access lines through one stderr pipe read slowly:"
    " lines cut by the other worker's writes",
    "messageless_calls": "5,000 calls of HEADERS with END_STREAM and no DATA frame (GetTask,"
    " CreateTask, WatchTasks), raw HTTP/2, against a server process: RSS before and after",
    "unread_connections_at_sigterm": "SIGTERM while a batch stream sends, with two"
    " message-less WatchTasks whose raw HTTP/2 clients stop reading (at once, or at the"
    " GOAWAY) and keep their connections open: the process's exit after the batch's response",
    "watch_memory_bound": "`watchers` raw HTTP/2 watchers grant no flow-control window after"
    " TYPE_CURRENT while a maximum-size task is updated `updates` times, server process with"
    " TASKSERVICE_WATCH_MEMORY_MB as on a 512 MiB instance; one more watcher reads everything",
    "hostile_soak": "auth on; 8 CRUD callers and 4 watchers alone (quiet), then for `seconds`"
    " among hostile callers in a process of their own (watchers that grant no window while a"
    " maximum-size task is updated, message-less calls, RST_STREAM storms, cancelled"
    " batches, all with valid tokens; `junk_lanes` junk-token callers while the certificate"
    " endpoint hangs), then alone again (settle); success, p99 per call client-side and from"
    " the access lines (server), the server's CPU and run-queue wait and the machine's busy"
    " share per run, RSS (s, MB) over time, memory by owner (memory_*: Python blocks, malloc"
    " in use / free but held, RSS after malloc_trim), watcher slots free afterwards",
    "interop_grpc_js": "@grpc/grpc-js at default settings: every RPC, 500/501-item streams,"
    " paging, ABORTED/BadRequest details decoded, 1 ms deadline, 40 cancels mid-stream, a"
    " batch over the default 4 MiB; `written` counts what each check left stored",
}


def _figures(entry: dict[str, object]) -> str:
    parts = []
    for key, value in entry.items():
        if key == "test":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
            parts.append(f"{key}: {value}")
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts)


def _row(entry: dict[str, object]) -> str:
    name = str(entry["test"])
    return f"| {name} | {WHAT.get(name, '')} | {_figures(entry)} |"


def _replace_rows(
    entries: list[dict[str, object]], tests: list[str], summary: str, returncode: int
) -> int:
    """Puts the rows of `entries` in place of the report's rows of the same
    tests, and says so under the table."""
    report = ROOT / "docs" / "reports" / "reliability.md"
    names = {str(e["test"]) for e in entries}
    new_rows = [_row(e) for e in entries]
    said = f"Rows {', '.join(sorted(names)) or '(none)'} regenerated on "
    lines: list[str] = []
    for line in report.read_text().splitlines():
        if line.startswith(said):  # an earlier run's note: this one replaces it
            if lines and not lines[-1]:
                lines.pop()
            continue
        name = line.split("|")[1].strip() if line.startswith("| ") else None
        if name in names:
            lines += new_rows  # where the first old row of these tests was
            new_rows = []
            continue
        lines.append(line)
    if new_rows:  # tests the report did not have yet: at the table's end
        end = max(i for i, line in enumerate(lines) if line.startswith("| "))
        lines[end + 1 : end + 1] = new_rows
    end = max(i for i, line in enumerate(lines) if line.startswith("| "))
    note = (
        f"{said}{dt.date.today().isoformat()} by"
        f" `python scripts/reliability_report.py --only {' '.join(tests)}`: `{summary}`"
        + ("" if returncode == 0 else " — **FAILED**")
    )
    lines[end + 1 : end + 1] = ["", note]
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return returncode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--soak-seconds", default="60")
    parser.add_argument("--fuzz-examples", default="300")
    parser.add_argument("--scaleout-seconds", default="90")
    parser.add_argument("--hostile-soak-seconds", default="180")
    parser.add_argument("--only", nargs="+", metavar="TEST_FILE", choices=TESTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.jsonl"
        env = {
            **os.environ,
            "TASKSERVICE_RELIABILITY_OUT": str(out),
            "TASKSERVICE_SOAK_SECONDS": args.soak_seconds,
            "TASKSERVICE_FUZZ_EXAMPLES": args.fuzz_examples,
            "TASKSERVICE_SCALEOUT_SECONDS": args.scaleout_seconds,
            "TASKSERVICE_HOSTILE_SOAK_SECONDS": args.hostile_soak_seconds,
            "TASKSERVICE_WATCH_MEMORY_FULL": "1",
        }
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(args.only or TESTS)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        entries = (
            [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        )
    if args.only:
        return _replace_rows(entries, args.only, summary, result.returncode)
    lines = [
        "# Reliability report",
        "",
        f"Generated by `python scripts/reliability_report.py` on {dt.date.today().isoformat()}:"
        f" Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.system()}"
        f" {platform.machine()}. Everything runs on loopback against real servers, real"
        " clients and the official Cloud Firestore emulator.",
        "",
        f"Test run: `{summary}`" + ("" if result.returncode == 0 else " — **FAILED**"),
        "",
        "| test | what it does | figures |",
        "| --- | --- | --- |",
    ]
    lines += [_row(entry) for entry in entries]
    lines += [
        "",
        "Reading the figures: `lost_writes`, `phantom_writes`, `duplicate_request_ids`,"
        " `lost_updates`, `etags_with_two_winners` and `half_written_batches` must be 0, as"
        " must `written` for cancelled batches;"
        " `codes` counts answers by gRPC code (ABORTED in the soak is the losing side of"
        " deliberate etag races; DEADLINE_EXCEEDED/UNAVAILABLE appear only while a backend"
        " is frozen or the server is stopping). Latencies are wall-clock on a shared"
        " 2-core machine with the load generator in the same box.",
        "",
        "Also covered by the suite without figures: store down at start (NOT_SERVING, then"
        " SERVING when the emulator appears: tests/test_outages.py), a silent store"
        " (DEADLINE_EXCEEDED within the caller's deadline), and the request size limit.",
        "",
    ]
    (ROOT / "docs" / "reports" / "reliability.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
