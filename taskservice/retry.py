"""One retry policy: a bounded number of attempts, full-jitter exponential
backoff, and never a pause that would end after the caller's deadline.

Used by the Firestore store (transient read failures; a read-modify-write
that lost a race) and by taskservice.client (UNAVAILABLE on a call that is
safe to repeat). google.api_core's AsyncRetry was the other candidate; it has
no cap on attempts and cannot hand the interceptor back the failed call it
must return, and this is twenty lines.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Before attempt n + 1, a pause drawn uniformly from [0, ceiling], the
    ceiling starting at `first` and growing by `multiplier` up to `maximum`."""

    attempts: int
    first: float
    maximum: float
    multiplier: float = 2.0

    def pause(self, tries: int) -> float:
        """A pause to take after `tries` failed attempts."""
        return random.uniform(0, min(self.first * self.multiplier ** (tries - 1), self.maximum))


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
    ceiling = backoff.first
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt(max(deadline - loop.time(), 0.0))
        except Exception as exc:
            pause = random.uniform(0, ceiling)
            if tries >= backoff.attempts or not retryable(exc) or loop.time() + pause >= deadline:
                raise
        await asyncio.sleep(pause)
        ceiling = min(ceiling * backoff.multiplier, backoff.maximum)
