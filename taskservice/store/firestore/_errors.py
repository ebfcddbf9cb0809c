"""What Firestore's errors mean to TaskService's callers, and which of them
are worth another try: UNAVAILABLE (and Firestore's transient INTERNAL,
UNKNOWN, CANCELLED) as UNAVAILABLE, safe to retry; DEADLINE_EXCEEDED and
ABORTED as themselves; RESOURCE_EXHAUSTED (quota) as RESOURCE_EXHAUSTED;
FAILED_PRECONDITION (e.g. an index still building) as FAILED_PRECONDITION.
Anything else (INVALID_ARGUMENT, OUT_OF_RANGE, PERMISSION_DENIED, ...) means
the service sent what it should not have or is misconfigured: INTERNAL,
logged with Firestore's own message. None of those is ever reported as
UNAVAILABLE, so no client retries it forever."""

from __future__ import annotations

import logging
import uuid

import grpc

from taskservice.domain.errors import (
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.store.firestore")

# Codes the caller is told as UNAVAILABLE ("retry later").
REPORTED_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
# Codes after which an idempotent read is tried again at once.
READ_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Codes after which the shared Listen stream reconnects (with backoff); any
# other code fails every watcher of it with store_error's status.
LISTEN_RECONNECTS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


def store_error(exc: grpc.aio.AioRpcError) -> ServiceError:
    """What a Firestore error means for the caller (see the module docstring)."""
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the store did not answer in time")
    if code == grpc.StatusCode.ABORTED:
        return Conflict("the task was changed concurrently; retry")
    if code in REPORTED_UNAVAILABLE:
        return Unavailable("the task store is unavailable; retry later")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        log.warning("Firestore: RESOURCE_EXHAUSTED: %s", (exc.details() or "")[:500])
        return ResourceExhausted(
            "the task store's quota is exhausted; retry later, with backoff",
            reason="STORE_RESOURCE_EXHAUSTED",
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        log.warning("Firestore: FAILED_PRECONDITION: %s", (exc.details() or "")[:500])
        return FailedPrecondition(
            "the task store cannot serve this request yet (for example, an index is still"
            " being built)",
            reason="STORE_NOT_READY",
        )
    error_id = uuid.uuid4().hex[:16]
    log.error(
        "Firestore refused a request: %s: %s (error_id=%s)",
        code.name,
        (exc.details() or "")[:500],
        error_id,
        extra={"fields": {"error_id": error_id}},
    )
    return Internal(f"internal error (error_id={error_id})", reason="STORE_REJECTED")


def past_read_error(exc: grpc.aio.AioRpcError) -> ServiceError:
    """A read at a past time that Firestore refuses is one too old to honour."""
    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        details = (exc.details() or "").lower()
        if "read_time" in details or "read time" in details or "too old" in details:
            return OutOfRange(
                "the resume token can no longer be honoured (Firestore no longer has the"
                " versions it points to); list the tasks again, then watch from now",
                reason="RESUME_TOKEN_EXPIRED",
            )
    return store_error(exc)
