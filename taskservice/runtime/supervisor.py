"""TASKSERVICE_WORKERS=N: N server processes on one port, and the parent that
supervises them.

A grpc.aio server uses about one core (the GIL); a Cloud Run instance may have
several. The parent creates no gRPC state at all (this module imports no
gRPC): it checks the port, then starts N workers as fresh interpreters
(`python -m taskservice` with the same flags). gRPC's multiprocessing example
forks before any gRPC state exists; a fresh interpreter is the same guarantee
without relying on fork. Each worker binds the port with SO_REUSEPORT, so the
kernel spreads connections across them.

- Readiness: a file of N bytes. A worker sets its byte once its store
  answers and clears it when it starts draining; every worker's health is
  SERVING only while every byte is set, so a probe says SERVING only when the
  whole instance is.
- SIGTERM or SIGINT: forwarded to every worker, each draining as one server
  does; the parent waits for all of them (SIGKILL after the grace period and
  a second) and exits 0 when every worker did.
- A worker that dies is started again after a pause (0.5 s, doubling to
  10 s), its readiness cleared meanwhile: one crash (one worker killed for
  memory, say) should not end the other workers' calls. Five deaths within
  60 s is a crash loop: the parent stops the rest and exits 1, so that Cloud
  Run replaces an instance that cannot serve.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from taskservice.config import Config
from taskservice.runtime.ports import check_bindable

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.supervisor")

RESTART_FIRST = 0.5
RESTART_MAX = 10.0
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_SECONDS = 60.0
_POLL = 0.1


class ReadinessBoard:
    """One byte per worker in a shared file: 1 ready, 0 not."""

    def __init__(self, path: str, count: int) -> None:
        self.path = path
        self.count = count
        self._file = open(path, "r+b")  # noqa: SIM115 - mapped for the process's life
        self._map = mmap.mmap(self._file.fileno(), count)

    @staticmethod
    def create(count: int) -> ReadinessBoard:
        fd, path = tempfile.mkstemp(prefix="taskservice-ready-")
        os.write(fd, b"\0" * count)
        os.close(fd)
        return ReadinessBoard(path, count)

    def mark(self, index: int, ready: bool) -> None:
        self._map[index] = 1 if ready else 0

    def all_ready(self) -> bool:
        return all(self._map[i] == 1 for i in range(self.count))

    def close(self, *, remove: bool = False) -> None:
        self._map.close()
        self._file.close()
        if remove:
            Path(self.path).unlink(missing_ok=True)


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.board = ReadinessBoard.create(config.workers)
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * config.workers
        self.restart_at: dict[int, float] = {}
        self.pause = [RESTART_FIRST] * config.workers
        self.deaths: list[float] = []
        self.stopping = False

    def _start(self, index: int) -> None:
        env = {
            **os.environ,
            "TASKSERVICE_WORKER": f"{index}/{self.config.workers}:{self.board.path}",
        }
        self.workers[index] = subprocess.Popen(
            [sys.executable, "-m", "taskservice", *self.argv], env=env
        )

    def _stop_requested(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_requested)
        log.info(
            "starting %d workers on %s",
            self.config.workers,
            self.config.address,
            extra={"fields": {"workers": self.config.workers}},
        )
        for index in range(self.config.workers):
            self._start(index)
        crash_loop = False
        while not self.stopping:
            now = time.monotonic()
            for index, proc in enumerate(self.workers):
                if proc is not None and proc.poll() is not None:
                    crash_loop = self._died(index, proc.returncode, now) or crash_loop
            if crash_loop:
                break
            for index, when in list(self.restart_at.items()):
                if now >= when:
                    del self.restart_at[index]
                    self._start(index)
            time.sleep(_POLL)
        codes = self._drain()
        self.board.close(remove=True)
        if crash_loop:
            log.error("workers keep dying; stopping the instance")
            return 1
        return 0 if all(code == 0 for code in codes) else 1

    def _died(self, index: int, code: int, now: float) -> bool:
        """Schedules a restart; True when this death makes a crash loop."""
        self.workers[index] = None
        self.board.mark(index, False)
        self.deaths = [t for t in self.deaths if now - t < CRASH_LOOP_SECONDS] + [now]
        pause = self.pause[index]
        self.pause[index] = min(pause * 2, RESTART_MAX)
        log.warning(
            "worker %d exited with code %d; starting it again in %.1f s",
            index,
            code,
            pause,
            extra={"fields": {"worker": index, "exit_code": code}},
        )
        self.restart_at[index] = now + pause
        return len(self.deaths) >= CRASH_LOOP_DEATHS

    def _drain(self) -> list[int]:
        """SIGTERM to every worker; their exit codes (SIGKILL after the grace)."""
        running = [p for p in self.workers if p is not None]
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds + 1.0
        codes = []
        for proc in running:
            try:
                codes.append(proc.wait(max(deadline - time.monotonic(), 0.0)))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes


def supervise(config: Config, argv: Sequence[str]) -> int:
    """Runs the workers until SIGTERM/SIGINT; OSError when the port is taken."""
    check_bindable(config.host, config.port)
    return Supervisor(config, argv).run()
