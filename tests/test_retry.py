"""Unit tests of taskservice.domain.retry: the one retry policy."""

from __future__ import annotations

import asyncio
from itertools import islice

import pytest

from taskservice.domain.retry import Backoff, exponential_pauses, retrying


class Flaky(Exception):
    pass


def failing(times: int, error: type[Exception] = Flaky) -> tuple[list[float], object]:
    seen: list[float] = []

    async def attempt(remaining: float) -> str:
        seen.append(remaining)
        if len(seen) <= times:
            raise error()
        return "done"

    return seen, attempt


async def test_retries_until_it_succeeds() -> None:
    seen, attempt = failing(3)
    result = await retrying(
        attempt,  # type: ignore[arg-type]
        retryable=lambda e: isinstance(e, Flaky),
        backoff=Backoff(attempts=5, first=0.001, maximum=0.01),
        timeout=5,
    )
    assert result == "done" and len(seen) == 4
    assert seen == sorted(seen, reverse=True)  # each attempt is told the time left


async def test_stops_after_the_last_attempt_with_its_error() -> None:
    seen, attempt = failing(10)
    with pytest.raises(Flaky):
        await retrying(
            attempt,  # type: ignore[arg-type]
            retryable=lambda e: isinstance(e, Flaky),
            backoff=Backoff(attempts=3, first=0.001, maximum=0.001),
            timeout=5,
        )
    assert len(seen) == 3


async def test_does_not_retry_what_it_is_not_told_to() -> None:
    seen, attempt = failing(1, ValueError)
    with pytest.raises(ValueError):
        await retrying(
            attempt,  # type: ignore[arg-type]
            retryable=lambda e: isinstance(e, Flaky),
            backoff=Backoff(attempts=5, first=0.001, maximum=0.001),
            timeout=5,
        )
    assert len(seen) == 1


async def test_never_pauses_past_the_deadline() -> None:
    seen, attempt = failing(100)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Flaky):
        await retrying(
            attempt,  # type: ignore[arg-type]
            retryable=lambda e: isinstance(e, Flaky),
            backoff=Backoff(attempts=100, first=0.05, maximum=0.2),
            timeout=0.3,
        )
    assert loop.time() - started < 0.31
    assert 2 <= len(seen) < 100


def test_pauses_are_full_jitter_under_a_ceiling_that_doubles_up_to_the_maximum() -> None:
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    runs = [list(islice(exponential_pauses(0.1, 1.0), len(ceilings))) for _ in range(300)]
    for n, ceiling in enumerate(ceilings):
        drawn = [run[n] for run in runs]
        assert all(0 <= pause <= ceiling for pause in drawn), (n, max(drawn))
        # Uniform over [0, ceiling]: 300 draws all in its lower or upper half
        # would happen once in 2**299 runs.
        assert min(drawn) < ceiling / 2 < max(drawn), (n, min(drawn), max(drawn))


def test_a_fresh_sequence_starts_from_the_first_ceiling() -> None:
    backoff = Backoff(first=0.01, maximum=10.0)
    spent = backoff.pauses()
    for _ in range(10):
        next(spent)  # its ceiling is now 10 s
    assert all(next(backoff.pauses()) <= 0.01 for _ in range(100))


async def test_an_unbounded_policy_retries_until_the_deadline() -> None:
    seen, attempt = failing(1_000)
    with pytest.raises(Flaky):
        await retrying(
            attempt,  # type: ignore[arg-type]
            retryable=lambda e: isinstance(e, Flaky),
            backoff=Backoff(first=0.001, maximum=0.002),
            timeout=0.2,
        )
    assert len(seen) > 50  # attempts bounded by time alone
