"""Unit tests of taskservice.domain.deadlines: many deadlines on one timer."""

from __future__ import annotations

import asyncio

from taskservice.domain.deadlines import SWEEP_SECONDS, Deadlines


async def test_keys_expire_at_their_deadlines_unless_discarded() -> None:
    loop = asyncio.get_running_loop()
    expired: dict[str, float] = {}
    deadlines: Deadlines[str] = Deadlines(lambda key: expired.setdefault(key, loop.time()))
    start = loop.time()
    deadlines.add("late", start + 0.3, loop)
    deadlines.add("soon", start + 0.1, loop)
    deadlines.add("dropped", start + 0.1, loop)
    deadlines.discard("dropped")
    await asyncio.sleep(0.3 + SWEEP_SECONDS + 0.5)
    assert set(expired) == {"soon", "late"}
    # Never early; late only by the sweep's granularity and a busy loop.
    assert 0.1 <= expired["soon"] - start < 0.1 + SWEEP_SECONDS + 0.25
    assert 0.3 <= expired["late"] - start < 0.3 + SWEEP_SECONDS + 0.25
    assert len(deadlines) == 0


async def test_shorten_brings_every_later_deadline_forward() -> None:
    loop = asyncio.get_running_loop()
    expired: list[str] = []
    deadlines: Deadlines[str] = Deadlines(expired.append)
    start = loop.time()
    deadlines.add("a", start + 60, loop)
    deadlines.add("b", start + 0.05, loop)
    deadlines.shorten(start + 0.1, loop)
    await asyncio.sleep(0.6)
    assert sorted(expired) == ["a", "b"]


async def test_an_expiry_that_fails_does_not_keep_the_others() -> None:
    loop = asyncio.get_running_loop()
    reported: list[object] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
    try:
        expired: list[str] = []

        def expire(key: str) -> None:
            if key == "bad":
                raise RuntimeError("boom")
            expired.append(key)

        deadlines: Deadlines[str] = Deadlines(expire)
        at = loop.time() + 0.05
        for key in ("first", "bad", "last"):
            deadlines.add(key, at, loop)
        await asyncio.sleep(0.5)
        assert expired == ["first", "last"]
        assert [str(e) for e in reported] == ["boom"]
    finally:
        loop.set_exception_handler(previous)
