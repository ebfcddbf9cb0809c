"""The wire form of errors, and the one place a call is ended with one.

A ServiceError becomes a gRPC status whose trailers carry a google.rpc.Status
with an ErrorInfo (always) and, for INVALID_ARGUMENT, a BadRequest naming each
field. Whatever the input, the status stays within the bounds of
taskservice.domain.limits (MAX_MESSAGE_BYTES, VIOLATIONS_SHOWN, MAX_TEXT,
MAX_METADATA_ENTRIES, MAX_METADATA_KEY), so a default client (8 KiB of
metadata) always receives it. Anything that is not a ServiceError becomes a
generic INTERNAL whose error id is logged beside the stack trace.
"""

from __future__ import annotations

import logging
import uuid
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from taskservice.domain.errors import (
    DOMAIN,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ServiceError,
    clip,
)
from taskservice.domain.limits import (
    MAX_MESSAGE_BYTES,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY,
    MAX_TEXT,
)

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.status")


def _message(err: ServiceError) -> str:
    data = err.message.encode()
    if len(data) <= MAX_MESSAGE_BYTES:
        return err.message
    return data[: MAX_MESSAGE_BYTES - 3].decode(errors="ignore") + "…"


def grpc_code(err: ServiceError) -> grpc.StatusCode:
    return _CODES[int(err.code)]


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def to_status(err: ServiceError) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=err.reason,
            domain=DOMAIN,
            metadata={
                clip(k, MAX_METADATA_KEY): clip(v, MAX_TEXT)
                for k, v in list(err.metadata.items())[:MAX_METADATA_ENTRIES]
            },
        )
    )
    details = [info]
    if isinstance(err, InvalidArgument):
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=clip(f, MAX_TEXT), description=clip(d, MAX_TEXT)
                    )
                    for f, d in err.violations
                ]
            )
        )
        details.append(bad)
    status = status_pb2.Status(code=int(err.code), message=_message(err), details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def as_service_error(exc: Exception, where: str) -> ServiceError:
    """The error a caller sees for exc: itself when it is a ServiceError, and
    otherwise DEADLINE_EXCEEDED for a timeout or a generic INTERNAL (logged
    with its stack trace and an error id the caller is given)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded("the call ran out of time")
    error_id = uuid.uuid4().hex[:16]
    log.error(
        "unhandled error in %s (error_id=%s)",
        where,
        error_id,
        exc_info=exc,
        extra={"fields": {"error_id": error_id}},
    )
    return Internal(f"internal error (error_id={error_id})")


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


async def abort(context: grpc.aio.ServicerContext[_Req, _Resp], err: ServiceError) -> NoReturn:
    """Ends the call with err's status (raises grpc.aio.AbortError)."""
    status = to_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)
