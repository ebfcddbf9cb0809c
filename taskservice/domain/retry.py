"""Retrying: one full-jitter exponential backoff sequence (exponential_pauses)
that every retry loop consumes, and retrying(), a bounded number of attempts
that never takes a pause ending after the caller's deadline.

retrying() serves the Firestore store (transient read failures; a
read-modify-write that lost a race) and taskservice.client (UNAVAILABLE on a
call that is safe to repeat); the reconnect loops of taskservice.client's
watch and the Firestore Listen hub draw their pauses from the same sequence.
None of them uses google.api_core's AsyncRetry: it has no cap on attempts, and
cannot hand taskservice.client's interceptor back the failed call it must
return.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def exponential_pauses(first: float, maximum: float, multiplier: float = 2.0) -> Iterator[float]:
    """Full-jitter backoff, forever: the n-th pause is drawn uniformly from
    [0, min(first * multiplier ** (n - 1), maximum)]. The one sequence every
    retry loop consumes (google.api_core.retry's exponential_sleep_generator,
    with full jitter); a loop that succeeds starts a fresh one."""
    ceiling = first
    while True:
        yield random.uniform(0, ceiling)
        ceiling = min(ceiling * multiplier, maximum)


@dataclass(frozen=True, slots=True)
class Backoff:
    """A retry policy: exponential_pauses(first, maximum, multiplier) between
    attempts, and at most `attempts` of them (None: until the loop is
    stopped, for reconnect loops that run as long as their owner)."""

    first: float
    maximum: float
    multiplier: float = 2.0
    attempts: int | None = None

    def pauses(self) -> Iterator[float]:
        """A fresh sequence of pauses, the first after one failed attempt."""
        return exponential_pauses(self.first, self.maximum, self.multiplier)


async def retrying(
    attempt: Callable[[float], Awaitable[T]],
    *,
    retryable: Callable[[Exception], bool],
    backoff: Backoff,
    timeout: float,
) -> T:
    """attempt(seconds left) until it returns; raises its last error when that
    error is not retryable, the attempts are spent, or the next pause would
    not end before `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pauses = backoff.pauses()
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt(max(deadline - loop.time(), 0.0))
        except Exception as exc:
            pause = next(pauses)
            spent = backoff.attempts is not None and tries >= backoff.attempts
            if spent or not retryable(exc) or loop.time() + pause >= deadline:
                raise
        await asyncio.sleep(pause)
