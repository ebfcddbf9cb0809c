"""Unit tests of taskservice.domain.validation: the rules for each value, without a server."""

from __future__ import annotations

import uuid

import pytest

from taskservice.domain.errors import InvalidArgument
from taskservice.domain.model import MUTABLE_FIELDS, OrderField, Ordering, etag_for, version_of
from taskservice.domain.validation import (
    TASK_ID,
    is_blank,
    mask_fields,
    new_task_id,
    ordering,
    page_size,
    tags,
)


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


# -- update masks ---------------------------------------------------------------


def test_mask_fields_names_the_mutable_fields_and_ignores_output_only_ones() -> None:
    assert mask_fields(["title", "state"]) == {"title", "state"}
    assert mask_fields(["title", "etag", "update_time"]) == {"title"}
    assert mask_fields(["*"]) == set(MUTABLE_FIELDS)


@pytest.mark.parametrize(
    ("paths", "field", "words"),
    [
        (["name", "etag"], "update_mask", "output-only"),
        (["title", "bogus"], "update_mask.paths[1]", "not a field"),
        (["*", "title"], "update_mask.paths[0]", "only path"),
        (["x"] * 17, "update_mask.paths", "at most 16"),
        (["x"] * 21_000, "update_mask.paths", "at most 16"),
    ],
)
def test_mask_fields_refuses(paths: list[str], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        mask_fields(paths)
    assert [f for f, _ in info.value.violations] == [field]
    assert words in info.value.message
    assert len(info.value.message) < 300  # even for 21,000 paths


# -- text -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "blank"),
    [
        ("", True),
        ("  \t\n", True),
        ("\u200b\ufeff\u2060", True),
        ("\u3164", True),
        ("\u00a0", True),
        ("a\u200b", False),
        ("é", False),
        ("\u0301", False),  # a combining mark alone is not invisible: it renders
    ],
)
def test_is_blank(text: str, blank: bool) -> None:
    assert is_blank(text) is blank


def test_tags_are_nfc_and_their_spellings_collide() -> None:
    out: list[tuple[str, str]] = []
    assert tags(["cafe\u0301", "x"], "t", out) == ("caf\u00e9", "x") and out == []
    tags(["caf\u00e9", "cafe\u0301"], "t", out)
    assert out == [("t[1]", "repeats t[0] (compared in NFC)")]
    out.clear()
    tags([f"t{i}" for i in range(33)], "t", out)
    assert out == [("t", "must hold at most 32 tags, got 33")]


# -- etags, page sizes, order ---------------------------------------------------


@pytest.mark.parametrize(
    ("etag", "version"),
    [
        ("18ed3ca36837a930", 0x18ED3CA36837A930),  # an issued one: whole microseconds
        ("3e8", 1000),
        ("18ed3ca36837a931", None),  # not whole microseconds
        ("0", None),
        ("8000000000000000", None),  # beyond int64
        ("ffffffffffffffff", None),
        ("18ED3CA36837A930", None),  # the service writes lower case
        ("1" * 17, None),
        ("", None),
        ("xyz", None),
    ],
)
def test_version_of_accepts_only_etags_a_store_could_issue(etag: str, version: int | None) -> None:
    assert version_of(etag) == version
    if version is not None:
        assert etag_for(version) == etag


def test_page_size_and_ordering() -> None:
    assert page_size(0) == 50 and page_size(7) == 7 and page_size(10**6) == 200
    with pytest.raises(InvalidArgument):
        page_size(-1)
    assert ordering("") == Ordering(OrderField.CREATE_TIME, descending=True)
    assert ordering("  update_time   desc ") == Ordering(OrderField.UPDATE_TIME, descending=True)
    with pytest.raises(InvalidArgument):
        ordering("title")
