"""Unit tests of taskservice.domain.tokens: page tokens, without a server."""

from __future__ import annotations

import base64
import time

import pytest

from taskservice.domain.errors import InvalidArgument
from taskservice.domain.model import Cursor, OrderField, Ordering, Priority, State, TaskFilter
from taskservice.domain.tokens import decode_token, encode_token, fingerprint

OPEN = fingerprint(TaskFilter(state=State.OPEN), Ordering())
NOW = time.time_ns()


def test_a_token_round_trips_for_its_own_query() -> None:
    cursor = Cursor(NOW, "some-task")
    assert decode_token(encode_token(cursor, OPEN), OPEN) == cursor


def test_the_fingerprint_is_the_query_not_its_spelling() -> None:
    assert fingerprint(TaskFilter(state=State.OPEN), Ordering()) == OPEN
    others = [
        fingerprint(TaskFilter(state=State.DONE), Ordering()),
        fingerprint(TaskFilter(state=State.OPEN, priority=Priority.LOW), Ordering()),
        fingerprint(TaskFilter(state=State.OPEN), Ordering(OrderField.UPDATE_TIME)),
        fingerprint(TaskFilter(state=State.OPEN), Ordering(descending=False)),
    ]
    assert OPEN not in others and len(set(others)) == len(others)


def _refused(token: str, query: bytes = OPEN) -> str:
    with pytest.raises(InvalidArgument) as info:
        decode_token(token, query)
    assert info.value.reason == "INVALID_PAGE_TOKEN"
    return info.value.message


def test_altered_truncated_and_foreign_tokens_are_refused() -> None:
    token = encode_token(Cursor(NOW, "some-task"), OPEN)
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert "altered" in _refused(flipped)
    assert "issued" in _refused(token[:8])
    assert "issued" in _refused("!!!not base64!!!")
    assert "issued" in _refused("x" * 600)
    other = fingerprint(TaskFilter(), Ordering())
    assert "different filter or order_by" in _refused(token, other)


@pytest.mark.parametrize(
    "cursor",
    [
        Cursor(NOW, ""),
        Cursor(NOW, ".."),
        Cursor(NOW, "a/b"),
        Cursor(NOW, "UPPER"),
        Cursor(-1, "abc"),
        Cursor(NOW + 2 * 24 * 3600 * 10**9, "abc"),  # two days ahead of any task
    ],
)
def test_a_minted_token_with_a_cursor_no_task_has_is_refused(cursor: Cursor) -> None:
    """The checksum key is public: a minted token is validated like input."""
    assert "issued" in _refused(encode_token(cursor, OPEN))


def test_the_token_is_url_safe_and_short() -> None:
    token = encode_token(Cursor(NOW, "a" * 63), OPEN)
    assert len(token) < 150
    base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
