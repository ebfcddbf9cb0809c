"""Unit checks of validation helpers that the contract suite cannot see directly."""

from __future__ import annotations

import uuid

from taskservice.validation import TASK_ID, new_task_id


def test_new_task_id_is_a_canonical_random_uuid() -> None:
    ids = [new_task_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower case, hyphenated
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert TASK_ID.fullmatch(text)  # also a valid task_id for tasks/{task_id}
    # The variant digit takes all four of its values: its two random bits are used.
    assert {text[19] for text in ids} == set("89ab")
