"""Unit tests of taskservice.retry: the one retry policy."""

from __future__ import annotations

import asyncio

import pytest

from taskservice.retry import Backoff, retrying


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
