"""Small helpers for tests: building requests, reading error details, and
skipping a whole suite loudly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tasks.v1 import task_service_pb2 as pb

LOUD_SKIPS: list[str] = []


def loud_skip(reason: str) -> NoReturn:
    """Skips, and repeats the reason in a red banner at the end of the run:
    for whole suites (Firestore, Node interop, containers) that did not run."""
    if reason not in LOUD_SKIPS:
        LOUD_SKIPS.append(reason)
    pytest.skip(reason)


@dataclass
class ErrorDetails:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: list[str]


def details_of(err: grpc.aio.AioRpcError) -> ErrorDetails:
    """The google.rpc.Status details an error carries (ErrorInfo is required)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status details on {err.code()}: {err.details()}"
    assert status.code == err.code().value[0]
    info = None
    fields: list[str] = []
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
        elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    assert info is not None, "every error must carry an ErrorInfo"
    return ErrorDetails(
        err.code(), err.details() or "", info.reason, info.domain, dict(info.metadata), fields
    )


async def expect_error(awaitable: Any, code: grpc.StatusCode) -> ErrorDetails:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
        details = details_of(err)
        assert details.domain == "taskservice"
        assert details.reason == details.reason.upper() and " " not in details.reason
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert details.fields, "INVALID_ARGUMENT must name the field(s)"
        assert "Traceback" not in details.message
        return details
    raise AssertionError(f"expected {code}, the call succeeded")


def create_request(title: str = "a task", **kwargs: Any) -> pb.CreateTaskRequest:
    task_fields = {
        k: kwargs.pop(k)
        for k in list(kwargs)
        if k in ("description", "priority", "assignee", "tags", "state")
    }
    return pb.CreateTaskRequest(task=pb.Task(title=title, **task_fields), **kwargs)


async def stream_of(requests: list[pb.CreateTaskRequest]) -> Any:
    for r in requests:
        yield r
