"""Many deadlines on one timer.

A server that bounds every call's wait with its own timer (asyncio.timeout,
wait_for) schedules and cancels a heap entry per call: ~30 µs of a busy
server's CPU per call (bench.stages). Deadlines keeps the waits in a dict and
one timer at the soonest deadline; what passes its deadline is handed to
`expire`, within SWEEP_SECONDS of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

SWEEP_SECONDS = 0.05


class Deadlines(Generic[K]):
    """Keys with a deadline each; `expire(key)` is called on the event loop
    once a key's deadline has passed, unless it was discarded first."""

    def __init__(self, expire: Callable[[K], None]) -> None:
        self._expire = expire
        self._deadlines: dict[K, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, key: K, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        """deadline: on the loop's clock (loop.time())."""
        self._deadlines[key] = deadline
        if self._timer is None or deadline < self._timer.when():
            self._schedule(deadline, loop)

    def discard(self, key: K) -> None:
        self._deadlines.pop(key, None)

    def shorten(self, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        """No key waits past `deadline`."""
        for key, when in self._deadlines.items():
            if when > deadline:
                self._deadlines[key] = deadline
        if self._deadlines and (self._timer is None or deadline < self._timer.when()):
            self._schedule(deadline, loop)

    def _schedule(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._sweep, loop, when)

    def _sweep(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._timer = None
        # asyncio runs a timer up to its clock's resolution early.
        now = max(loop.time(), when)
        overdue = [key for key, when in self._deadlines.items() if when <= now]
        for key in overdue:
            del self._deadlines[key]
        if self._deadlines:
            soonest = min(self._deadlines.values())
            self._schedule(max(soonest, now + SWEEP_SECONDS), loop)
        for key in overdue:
            try:
                self._expire(key)
            except Exception as exc:  # the others still expire
                loop.call_exception_handler(
                    {"message": "a deadline's expiry failed", "exception": exc}
                )
