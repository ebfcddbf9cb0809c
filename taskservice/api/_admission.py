"""Admission: which pool a call counts against (TaskService calls, WatchTasks
streams, health Watch and reflection streams), the bound of each, the calls
still running, and the drain signal every call of one server shares. Beyond
its bound a pool refuses at once (RESOURCE_EXHAUSTED); health Check is never
refused."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from taskservice.config import Config
from taskservice.domain.deadlines import Deadlines
from taskservice.domain.errors import ResourceExhausted

DEFAULTS = Config()  # each setting's declared default

# When the server drains, how long a call still waiting for its request
# message is given for it (one that has reached the server takes milliseconds).
DRAIN_REQUEST_GRACE_SECONDS = 0.3

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
WATCH_TASKS = "/tasks.v1.TaskService/WatchTasks"
TOOL_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Pool(enum.Enum):
    """What a call is counted against."""

    CALLS = "TaskService calls"
    WATCHERS = "WatchTasks streams"
    TOOL_STREAMS = "health Watch and reflection streams"


_REFUSAL_REASONS = {
    Pool.CALLS: "TOO_MANY_CALLS",
    Pool.WATCHERS: "TOO_MANY_WATCHERS",
    Pool.TOOL_STREAMS: "TOO_MANY_STREAMS",
}
# Reasons of other codes that are the server's doing: it is at capacity.
SERVER_REASONS = frozenset(_REFUSAL_REASONS.values())


def pool_of(method: str) -> Pool | None:
    if method == HEALTH_CHECK:
        return None  # never refused
    if method.startswith(TOOL_PREFIXES):
        return Pool.TOOL_STREAMS
    if method == WATCH_TASKS:
        return Pool.WATCHERS
    return Pool.CALLS


@dataclass(frozen=True)
class CallLimits:
    """The admission bounds; defaults are the settings' (taskservice.config)."""

    max_calls: int = DEFAULTS.max_concurrent_rpcs  # TaskService calls in flight
    max_watchers: int = DEFAULTS.max_watchers  # WatchTasks streams open
    max_tool_streams: int = DEFAULTS.max_tool_streams  # health Watch and reflection streams
    tool_stream_idle_seconds: float = DEFAULTS.tool_stream_idle_seconds


class CallGate:
    """Admission counts and the drain signal, shared by every call of one server."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._bounds = {
            Pool.CALLS: limits.max_calls,
            Pool.WATCHERS: limits.max_watchers,
            Pool.TOOL_STREAMS: limits.max_tool_streams,
        }
        self.in_flight = dict.fromkeys(Pool, 0)
        self.started = 0  # calls the pipeline has picked up, ever
        # Calls the pipeline has picked up whose gRPC call has not finished:
        # every call, counted or not, until its status is sent or given up.
        self.running = 0
        self.draining = asyncio.Event()
        # The calls waiting for their request message.
        self.reading = WaitingReads()

    def admit(self, pool: Pool) -> None:
        if self.in_flight[pool] >= self._bounds[pool]:
            raise ResourceExhausted(
                f"too many {pool.value} in flight ({self._bounds[pool]}); retry later",
                reason=_REFUSAL_REASONS[pool],
            )
        self.in_flight[pool] += 1

    def release(self, pool: Pool) -> None:
        self.in_flight[pool] -= 1

    def drain(self) -> None:
        """Every stream ends (UNAVAILABLE), and a call still waiting for its
        request message gets DRAIN_REQUEST_GRACE_SECONDS for it."""
        self.draining.set()
        loop = asyncio.get_running_loop()
        self.reading.shorten(loop.time() + DRAIN_REQUEST_GRACE_SECONDS, loop)


class WaitingReads:
    """The calls waiting for their request message, each with a deadline on
    one shared timer (taskservice.domain.deadlines): a call past its deadline
    is cancelled, and `expired` tells its own code that the cancel was the
    deadline's."""

    def __init__(self) -> None:
        self.expired: set[asyncio.Task[object]] = set()
        self._deadlines: Deadlines[asyncio.Task[object]] = Deadlines(self._expire)

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(
        self, task: asyncio.Task[object], deadline: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._deadlines.add(task, deadline, loop)

    def discard(self, task: asyncio.Task[object]) -> None:
        self._deadlines.discard(task)
        self.expired.discard(task)

    def shorten(self, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        self._deadlines.shorten(deadline, loop)

    def _expire(self, task: asyncio.Task[object]) -> None:
        self.expired.add(task)
        task.cancel()
