"""Domain errors: what went wrong, in terms a caller can act on.

Validation, the stores, auth and the servicer raise ServiceError subclasses;
none of them knows the wire. Each carries a canonical code (Code, the gRPC
numbering), an UPPER_SNAKE_CASE reason, metadata for the ErrorInfo, and for
InvalidArgument the violated fields. taskservice.api.status turns one into a gRPC
status. Messages are written for the caller: never internal text.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from taskservice.domain.limits import VIOLATIONS_SHOWN

DOMAIN = "taskservice"

Violation = tuple[str, str]  # (field path, what is wrong with it)


def clip(text: str, limit: int) -> str:
    """text, cut to `limit` characters: for echoing caller input in a message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Code(enum.IntEnum):
    """The canonical status codes (google.rpc.Code; the same numbers as gRPC)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ServiceError(Exception):
    """An error the caller should see, with a canonical code and a reason."""

    code: Code = Code.UNKNOWN
    reason: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    """Bad input; violations name each offending field path.

    Only the first VIOLATIONS_SHOWN violations are kept (and spelled out in
    the message); metadata["violation_count"] says how many there were when
    that is more.
    """

    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Sequence[Violation],
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        total: int | None = None,
    ) -> None:
        self.total = len(violations) if total is None else total
        self.violations = list(violations[:VIOLATIONS_SHOWN])
        message = "; ".join(f"{f}: {d}" for f, d in self.violations)
        extra = dict(metadata or {})
        if self.total > len(self.violations):
            message += f" (and {self.total - len(self.violations)} more)"
            extra["violation_count"] = str(self.total)
        super().__init__(message, reason=reason, metadata=extra)

    def prefixed(self, prefix: str) -> InvalidArgument:
        """The same violations with field paths under `prefix` (e.g. requests[3])."""
        return InvalidArgument(
            [(f"{prefix}.{f}", d) for f, d in self.violations],
            reason=self.reason,
            metadata={k: v for k, v in self.metadata.items() if k != "violation_count"},
            total=self.total,
        )


class NotFound(ServiceError):
    code = Code.NOT_FOUND
    reason = "TASK_NOT_FOUND"


class AlreadyExists(ServiceError):
    code = Code.ALREADY_EXISTS
    reason = "TASK_ALREADY_EXISTS"

    def __init__(self, message: str, *, index: int = 0, name: str = "") -> None:
        super().__init__(message, metadata={"name": name} if name else None)
        self.index = index  # which item of a batch
        self.name = name


class EtagMismatch(ServiceError):
    code = Code.ABORTED
    reason = "ETAG_MISMATCH"


class Conflict(ServiceError):
    """Too much contention to apply a write; safe to retry."""

    code = Code.ABORTED
    reason = "CONCURRENT_MODIFICATION"


class FailedPrecondition(ServiceError):
    code = Code.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class OutOfRange(ServiceError):
    code = Code.OUT_OF_RANGE
    reason = "OUT_OF_RANGE"


class ResourceExhausted(ServiceError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = Code.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"


class Unimplemented(ServiceError):
    code = Code.UNIMPLEMENTED
    reason = "UNKNOWN_METHOD"


class DeadlineExceeded(ServiceError):
    code = Code.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    code = Code.CANCELLED
    reason = "CANCELLED"


class Internal(ServiceError):
    code = Code.INTERNAL
    reason = "INTERNAL"


class Unauthenticated(ServiceError):
    code = Code.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = Code.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


# The codes a server causes (OpenTelemetry's RPC conventions mark a server
# span ERROR for these only); of them, the error-ratio alert counts those the
# caller did not cause (taskservice.api.calls).
SERVER_CODES = frozenset(
    ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")
)
