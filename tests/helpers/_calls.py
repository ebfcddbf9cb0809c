"""Small helpers for tests: building requests, reading error details, and
skipping a whole suite loudly."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import grpc
import pytest
from tasks.v1 import task_service_pb2 as pb

from taskservice.client import ErrorDetails, error_details

LOUD_SKIPS: list[str] = []


def loud_skip(reason: str) -> NoReturn:
    """Skips, and repeats the reason in a red banner at the end of the run:
    for whole suites (Firestore, Node interop, containers) that did not run."""
    if reason not in LOUD_SKIPS:
        LOUD_SKIPS.append(reason)
    pytest.skip(reason)


def details_of(err: grpc.aio.AioRpcError) -> ErrorDetails:
    """The google.rpc.Status details an error carries (ErrorInfo is required)."""
    details = error_details(err)
    assert details.has_status, f"no google.rpc.Status details on {err.code()}: {err.details()}"
    assert details.status_code == err.code().value[0]
    assert details.has_error_info, "every error must carry an ErrorInfo"
    return details


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


def json_lines(output: str) -> list[dict[str, Any]]:
    """The JSON log lines in a process's output, parsed (other lines skipped)."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]
