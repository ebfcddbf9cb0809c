"""Unit tests of taskservice.domain.filtering: the AIP-160 subset, parsed without a server."""

from __future__ import annotations

import pytest

from taskservice.domain.errors import InvalidArgument
from taskservice.domain.filtering import parse_filter
from taskservice.domain.model import Priority, State, TaskFilter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", TaskFilter()),
        ("   ", TaskFilter()),
        ("state = STATE_OPEN", TaskFilter(state=State.OPEN)),
        ("state=STATE_DONE", TaskFilter(state=State.DONE)),
        ("priority = PRIORITY_CRITICAL", TaskFilter(priority=Priority.CRITICAL)),
        ('assignee = "ana@example.com"', TaskFilter(assignee="ana@example.com")),
        ('assignee = ""', TaskFilter(assignee="")),
        ('assignee = "q\\"uote\\\\"', TaskFilter(assignee='q"uote\\')),
        ('tags:"with space"', TaskFilter(tag="with space")),
        ('tags:"cafe\u0301"', TaskFilter(tag="caf\u00e9")),  # compared in NFC
        (
            'tags:"ops" AND state = STATE_OPEN AND priority = PRIORITY_HIGH AND assignee="b"',
            TaskFilter(state=State.OPEN, priority=Priority.HIGH, assignee="b", tag="ops"),
        ),
    ],
)
def test_parses(text: str, expected: TaskFilter) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('title = "x"', "unsupported field 'title'"),
        ("state = OPEN", "is not one of"),
        ("state = STATE_UNSPECIFIED", "is not one of"),
        ("state = STATE_OPEN OR state = STATE_DONE", "expected AND"),
        ("state = STATE_OPEN AND", "incomplete restriction"),
        ("state = STATE_OPEN AND state = STATE_DONE", "more than once"),
        ('assignee = "open', "unterminated string"),
        ("assignee = ana", "takes a quoted string"),
        # The hint says what to write instead.
        ("state == STATE_OPEN", "use a single '=': state = STATE_OPEN"),
        ("priority == PRIORITY_HIGH", "use a single '=': priority = PRIORITY_HIGH"),
        ("state != STATE_OPEN", "only '=' is supported: state = STATE_OPEN"),
        ("assignee = ana@example.com", 'quote strings: assignee = "ana@example.com"'),
        ("tags:ops-team", 'quote strings: tags:"ops-team"'),
        ("state = OPEN", "did you mean STATE_OPEN?"),
        ("state = done", "did you mean STATE_DONE?"),
        ('tags = "x"', "must be followed by ':'"),
        ("(state = STATE_OPEN)", "unexpected character '('"),
        ("x" * 1025, "longer than 1024"),
    ],
)
def test_refuses_naming_the_problem(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filter(text)
    assert info.value.reason == "INVALID_FILTER"
    assert [f for f, _ in info.value.violations] == ["filter"]
    assert words in info.value.message


def test_an_echoed_word_is_clipped() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filter("x" * 1000 + ' = "y"')
    assert len(info.value.message) < 200
