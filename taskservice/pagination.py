"""Opaque page tokens for ListTasks.

A token holds the cursor (sort time and task id of the last task returned) and
a fingerprint of the query it belongs to (filter and order, not page size),
sealed with a keyed checksum. A token that was altered, truncated, or sent
with another filter or order_by is rejected as INVALID_ARGUMENT. The checksum
guards integrity, not secrecy: a token reveals nothing a caller could not list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct

from taskservice.errors import InvalidArgument
from taskservice.model import Cursor, Ordering, TaskFilter

_VERSION = 1
_KEY = b"taskservice.v1.page-token"
_HEAD = struct.Struct(">B8sq")  # version, query fingerprint, sort time (ns)
_MAC_SIZE = 12
MAX_TOKEN_LENGTH = 512


def fingerprint(task_filter: TaskFilter, ordering: Ordering) -> bytes:
    """Identifies a query's filter and order, whatever its spelling."""
    canonical = repr((task_filter, ordering.field.value, ordering.descending)).encode()
    return hashlib.blake2b(canonical, digest_size=8).digest()


def _mac(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, key=_KEY, digest_size=_MAC_SIZE).digest()


def encode_token(cursor: Cursor, query_fingerprint: bytes) -> str:
    payload = _HEAD.pack(_VERSION, query_fingerprint, cursor.time_ns) + cursor.task_id.encode()
    return base64.urlsafe_b64encode(payload + _mac(payload)).rstrip(b"=").decode()


def _invalid(problem: str) -> InvalidArgument:
    return InvalidArgument([("page_token", problem)], reason="INVALID_PAGE_TOKEN")


def decode_token(token: str, query_fingerprint: bytes) -> Cursor:
    """The cursor in `token`; INVALID_ARGUMENT unless it is intact and was
    issued for the same filter and order."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise _invalid("is not a token this service issued")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise _invalid("is not a token this service issued") from None
    if len(raw) < _HEAD.size + _MAC_SIZE:
        raise _invalid("is not a token this service issued")
    payload, mac = raw[:-_MAC_SIZE], raw[-_MAC_SIZE:]
    if not hmac.compare_digest(_mac(payload), mac):
        raise _invalid("is corrupted or was altered")
    version, fp, time_ns = _HEAD.unpack_from(payload)
    if version != _VERSION:
        raise _invalid("was issued by an incompatible version; start listing again")
    if fp != query_fingerprint:
        raise _invalid("belongs to a different filter or order_by; send the same ones as before")
    try:
        task_id = payload[_HEAD.size :].decode()
    except UnicodeDecodeError:
        raise _invalid("is corrupted or was altered") from None
    return Cursor(time_ns=time_ns, task_id=task_id)
