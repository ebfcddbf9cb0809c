"""Opaque page tokens for ListTasks.

A token holds the cursor (sort time and task id of the last task returned) and
a fingerprint of the query it belongs to (filter and order, not page size),
with a checksum. A token that was altered, truncated, or sent with another
filter or order_by is rejected as INVALID_ARGUMENT.

The checksum guards integrity against accidents (a token cut short, mangled
in a URL, or sent with another query), not authenticity: its key is a
constant in this source, so anyone can mint a token. That is harmless by
design, because a decoded cursor is validated like any input (a task id of
the service's form, a time that a task could have) before it reaches a store,
and the furthest a minted cursor can lead is to a position in a listing the
caller could page to anyway. A token reveals nothing a caller could not list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time

from taskservice.domain.errors import InvalidArgument
from taskservice.domain.limits import MAX_PAGE_TOKEN_LENGTH
from taskservice.domain.model import Cursor, Ordering, TaskFilter
from taskservice.domain.validation import TASK_ID

_VERSION = 1
_KEY = b"taskservice.v1.page-token"
_HEAD = struct.Struct(">B8sq")  # version, query fingerprint, sort time (ns)
_MAC_SIZE = 12
# A cursor's time is a task's create or update time: never negative, and
# never far ahead of this clock (a day leaves room for skew between clocks).
_FUTURE_SLACK_NS = 24 * 3600 * 10**9


def fingerprint(task_filter: TaskFilter, ordering: Ordering) -> bytes:
    """Identifies a query's filter and order, whatever its spelling."""
    canonical = repr((task_filter, ordering.field.value, ordering.descending)).encode()
    return hashlib.blake2b(canonical, digest_size=8).digest()


class TokenProblem(Exception):
    """What is wrong with a sealed token, in words for the caller."""


def seal(payload: bytes, key: bytes) -> str:
    """payload with a keyed MAC, as unpadded URL-safe base64 (page tokens here,
    resume tokens in taskservice.api.watching: each with a key of its own)."""
    mac = hashlib.blake2b(payload, key=key, digest_size=_MAC_SIZE).digest()
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()


def unseal(token: str, key: bytes, *, max_length: int, min_payload: int) -> bytes:
    """The payload that seal(payload, key) made into `token`; TokenProblem
    unless the token is one and is intact."""
    if len(token) > max_length:
        raise TokenProblem("is not a token this service issued")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise TokenProblem("is not a token this service issued") from None
    if len(raw) < min_payload + _MAC_SIZE:
        raise TokenProblem("is not a token this service issued")
    payload, mac = raw[:-_MAC_SIZE], raw[-_MAC_SIZE:]
    expected = hashlib.blake2b(payload, key=key, digest_size=_MAC_SIZE).digest()
    if not hmac.compare_digest(expected, mac):
        raise TokenProblem("is corrupted or was altered")
    return payload


def encode_token(cursor: Cursor, query_fingerprint: bytes) -> str:
    payload = _HEAD.pack(_VERSION, query_fingerprint, cursor.time_ns) + cursor.task_id.encode()
    return seal(payload, _KEY)


def _invalid(problem: str) -> InvalidArgument:
    return InvalidArgument([("page_token", problem)], reason="INVALID_PAGE_TOKEN")


def decode_token(token: str, query_fingerprint: bytes) -> Cursor:
    """The cursor in `token`; INVALID_ARGUMENT unless it is intact and was
    issued for the same filter and order."""
    try:
        payload = unseal(token, _KEY, max_length=MAX_PAGE_TOKEN_LENGTH, min_payload=_HEAD.size)
    except TokenProblem as problem:
        raise _invalid(str(problem)) from None
    version, fp, time_ns = _HEAD.unpack_from(payload)
    if version != _VERSION:
        raise _invalid("was issued by an incompatible version; start listing again")
    if fp != query_fingerprint:
        raise _invalid("belongs to a different filter or order_by; send the same ones as before")
    try:
        task_id = payload[_HEAD.size :].decode()
    except UnicodeDecodeError:
        raise _invalid("is corrupted or was altered") from None
    if TASK_ID.fullmatch(task_id) is None or not (
        0 <= time_ns <= time.time_ns() + _FUTURE_SLACK_NS
    ):
        raise _invalid("is not a token this service issued")
    return Cursor(time_ns=time_ns, task_id=task_id)
