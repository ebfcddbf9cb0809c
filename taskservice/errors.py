"""Domain errors and their wire form: canonical codes with google.rpc.Status details.

Stores and validation raise ServiceError subclasses; the servicer turns them
into a grpc status carrying an ErrorInfo (always) and a BadRequest (for
INVALID_ARGUMENT). Messages are written for the caller: never internal text.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "taskservice"


class ServiceError(Exception):
    """An error the caller should see, with a canonical code and a reason."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        if reason is not None:
            self.reason = reason

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        )
        return [info]

    def to_grpc_status(self) -> grpc.Status:
        status = status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self.details()
        )
        result: grpc.Status = rpc_status.to_status(status)
        return result


class InvalidArgument(ServiceError):
    """Bad input; violations name each offending field path."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]], *, reason: str | None = None) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{f}: {d}" for f, d in self.violations), reason=reason)

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [*super().details(), packed]

    def prefixed(self, prefix: str) -> InvalidArgument:
        """The same violations with field paths under `prefix` (e.g. requests[3])."""
        return InvalidArgument(
            [(f"{prefix}.{f}", d) for f, d in self.violations], reason=self.reason
        )


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "TASK_NOT_FOUND"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "TASK_ALREADY_EXISTS"

    def __init__(self, message: str, *, index: int = 0, name: str = "") -> None:
        super().__init__(message, metadata={"name": name} if name else None)
        self.index = index  # which item of a batch
        self.name = name


class EtagMismatch(ServiceError):
    code = grpc.StatusCode.ABORTED
    reason = "ETAG_MISMATCH"


class Conflict(ServiceError):
    """Too much contention to apply a write; safe to retry."""

    code = grpc.StatusCode.ABORTED
    reason = "CONCURRENT_MODIFICATION"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"
