"""The access line: what one call reports (CallRecord), whose doing its
status is (`fault`), the method as gRFC A66 names it, and the line itself,
written once per call, refused or not, under the logger taskservice.access."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, TypeAlias

import grpc
from google.protobuf.message import Message

from taskservice.api._admission import SERVER_REASONS, TOOL_PREFIXES, Pool
from taskservice.domain.errors import SERVER_CODES
from taskservice.observe.jsonlog import log_fields

if TYPE_CHECKING:
    from taskservice.observe.telemetry import CallSpan

log = logging.getLogger("taskservice.access")
# A call's context as the pipeline registers its handlers: they read the raw
# request bytes (the pipeline decodes them) and answer protobuf messages.
Context: TypeAlias = grpc.aio.ServicerContext[bytes, Message]
# A cancel with at most this much of the server's deadline left is the
# caller's deadline passing (deadline_passed).
DEADLINE_SLACK_SECONDS = 0.1

# gRFC A66's name for a method the server does not have (unbounded names
# would be a label anyone could multiply).
UNKNOWN_METHOD = "other"
# ErrorInfo reasons of server-side codes that the caller caused: a stream it
# let go silent or sent too slowly, a deadline that passed while the server
# waited for its next message, or that ended a server stream (WatchTasks,
# health Watch: the caller chose how long to listen).
CALLER_REASONS = frozenset(("STREAM_IDLE", "STREAM_TOO_SLOW", "CALLER_TOO_SLOW", "STREAM_DEADLINE"))


class CallRecord:
    """What the access line of one call reports."""

    __slots__ = (
        "admitted",
        "code",
        "context",
        "last_sent",
        "left",
        "messages_in",
        "messages_out",
        "method",
        "reason",
        "request",
        "request_bytes",
        "requested",
        "response_bytes",
        "span",
        "started",
        "waiting_on_caller",
    )

    def __init__(self, method: str, context: Context) -> None:
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.code = "UNKNOWN"
        self.reason = ""
        self.requested = ""  # the path an unknown method was called with
        self.waiting_on_caller = False  # awaiting the caller's next message
        self.admitted: Pool | None = None
        self.request = b""
        self.request_bytes = 0
        self.response_bytes = 0
        self.messages_in: int | None = None
        self.messages_out: int | None = None
        self.last_sent: Message | None = None
        self.left = False
        self.span: CallSpan | None = None


def size_of(message: object) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


def deadline_passed(context: Context) -> bool:
    """Whether the caller's deadline has passed, or is about to pass on the
    server's clock: the caller's deadline runs from when it sent the call,
    the server's from when the call arrived, so the caller's cancel at its
    deadline reaches the server with a little of the server's deadline left
    (2 to 8 ms measured on loopback, tests/test_incident.py; more behind a
    front end). A caller that cancels within DEADLINE_SLACK_SECONDS of its
    deadline is logged as DEADLINE_EXCEEDED."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_SECONDS


def fault(code: str, reason: str) -> str:
    """Whose doing a status is: `none` for OK; `server` for a server-side code
    the caller did not cause, and for a refusal at capacity (TOO_MANY_*);
    else `caller`."""
    if code == "OK":
        return "none"
    if code in SERVER_CODES:
        return "caller" if reason in CALLER_REASONS else "server"
    return "server" if reason in SERVER_REASONS else "caller"


def access_line(call: CallRecord) -> None:
    code = call.code
    if code in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
        level = logging.ERROR
    elif call.method.startswith(TOOL_PREFIXES):
        level = logging.DEBUG  # probes and tools: every few seconds, all alike
    else:
        level = logging.INFO
    if not log.isEnabledFor(level):
        return
    name = metric_name(call.method)
    fields: dict[str, object] = {
        "grpc.method": name,
        "grpc.code": code,
        "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
        "peer": call.context.peer(),
        "request_bytes": call.request_bytes,
        "response_bytes": call.response_bytes,
    }
    if call.messages_in is not None:
        fields["request_messages"] = call.messages_in
    if call.messages_out is not None:
        fields["response_messages"] = call.messages_out
    fields["fault"] = fault(code, call.reason)
    if call.reason:
        fields["reason"] = call.reason
    if call.requested:
        fields["requested_method"] = call.requested
    log_fields(log, level, f"{call.requested or name} {code}", fields)


def metric_name(method: str) -> str:
    """A method as gRFC A66 names it in metrics, and the access line too."""
    return method.removeprefix("/")
