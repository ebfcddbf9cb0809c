"""What every call passes through, from the moment gRPC hands it over until its
access line is written.

In order, for every method of every service (TaskService, health, reflection):

1. The caller's trace is read from the metadata (tracing.parse_trace; a
   malformed header is ignored) and bound to the call's log lines. With
   telemetry on (taskservice.telemetry), the call's span starts here, a child
   of the caller's, and its metrics are counted from here to the status.
2. Authentication, when configured, for TaskService methods (health and
   reflection stay open for probes and tools).
3. Admission. TaskService calls, WatchTasks streams, and the long-lived
   health Watch and reflection streams are counted apart, each against its
   own bound (beyond it: RESOURCE_EXHAUSTED at once), so none can starve the
   others, and calls refused by auth never take a slot. Health Check is never
   refused: it is the liveness probe, and answers from memory.
4. The request bytes are read and decoded here (before auth and admission
   for methods that take one message), so a message that is not valid
   protobuf gets INVALID_ARGUMENT rather than gRPC's UNKNOWN with parser
   text, and a call without its message is answered (see wrap).
5. The handler runs. A ServiceError becomes its status (taskservice.status);
   a timeout, DEADLINE_EXCEEDED; anything else a generic INTERNAL whose error
   id is logged with the stack trace.
6. Server streams are written from here: a stream idle longer than its limit
   ends, and when the server starts draining every stream ends at once with
   UNAVAILABLE, so open streams cannot hold the shutdown. A stream's own
   code can end it too, even while a write waits for a client that does not
   read (StreamControl.end), and say what its ending status carries
   (StreamControl.status_metadata: WatchTasks puts its resume token there).
   A stream so ended frees its slot at once; a message in flight is given a
   moment to arrive before the status, and the handler waits a few seconds
   at most for the status to go out behind it.
7. One access line per call, refused or not: method, code, latency, peer,
   request and response sizes, and message counts for streams. Payloads and
   credentials are never logged. With telemetry on, the same figures go to
   the call's metrics and span. The method is named as gRPC's metrics name it
   (gRFC A66: `tasks.v1.TaskService/GetTask`; `other` for a method the server
   does not have). The code is the one the caller got: a call whose deadline
   passed is DEADLINE_EXCEEDED (grpc.aio cancels it; only
   time_remaining() tells the two apart), one the caller cancelled,
   CANCELLED. Every line says whose doing its code is (`fault`: `none` for
   OK, `server`, or `caller` for a caller's mistake, a caller's cancel and a
   deadline that passed while the server waited for the caller's next
   message or that ended a server stream) and, when known, the ErrorInfo
   `reason`: the error-ratio alert counts server faults only.

Calls gRPC itself would refuse before any handler runs are brought into the
pipeline, so that they are logged and counted too: an unknown method
(UNIMPLEMENTED, from a catch-all handler, CallPipeline.unknown_methods), and a
request message over limits.MAX_REQUEST_BYTES (RESOURCE_EXHAUSTED,
REQUEST_TOO_LARGE), checked here behind a transport limit of
limits.MAX_TRANSPORT_MESSAGE_BYTES, which bounds what one call can make the
server buffer.

PipelineRegistrar stands in for the grpc.aio server in the generated
add_*_to_server functions and registers every method already wrapped: no
per-call interceptor machinery, and registered methods keep gRPC's fast
pre-registered path.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc

# What a send to a client that went away raises (grpc.aio has no public name).
from grpc._cython.cygrpc import ExecuteBatchError  # type: ignore[import-not-found]

from taskservice.auth import IdTokenVerifier
from taskservice.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Unimplemented,
)
from taskservice.jsonlog import log_fields
from taskservice.limits import (
    MAX_REQUEST_BYTES,
    MAX_STORE_CALL_SECONDS,
    REQUEST_MESSAGE_SECONDS,
)
from taskservice.status import abort, as_service_error
from taskservice.tracing import current_trace, parse_trace

if TYPE_CHECKING:
    from taskservice.telemetry import CallSpan, Telemetry

log = logging.getLogger("taskservice.access")
# When the server drains, how long a stream's message in flight may take to
# reach its client before the stream is cut.
DRAIN_WRITE_GRACE_SECONDS = 1.0
# When the server drains, how long a call still waiting for its request
# message is given for it (one that has reached the server takes milliseconds).
DRAIN_REQUEST_GRACE_SECONDS = 0.3
# How long the handler waits for a call's error status to be sent (it waits
# behind the stream's messages in flight, for a client that grants no
# window); then it leaves the status to gRPC core.
STATUS_SEND_SECONDS = 5.0
T = TypeVar("T")
# A cancel with at most this much of the server's deadline left is the
# caller's deadline passing (_deadline_passed).
DEADLINE_SLACK_SECONDS = 0.1

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
WATCH_TASKS = "/tasks.v1.TaskService/WatchTasks"
_TOOL_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# gRFC A66's name for a method the server does not have (unbounded names
# would be a label anyone could multiply).
UNKNOWN_METHOD = "other"
# The codes a server causes (OpenTelemetry's RPC conventions mark a server
# span ERROR for these only); of them, the error-ratio alert counts those the
# caller did not cause (see _fault).
SERVER_CODES = frozenset(
    ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")
)
# ErrorInfo reasons of server-side codes that the caller caused: a stream it
# let go silent or sent too slowly, a deadline that passed while the server
# waited for its next message, or that ended a server stream (WatchTasks,
# health Watch: the caller chose how long to listen).
CALLER_REASONS = frozenset(("STREAM_IDLE", "STREAM_TOO_SLOW", "CALLER_TOO_SLOW", "STREAM_DEADLINE"))


class Pool(enum.Enum):
    """What a call is counted against."""

    CALLS = "TaskService calls"
    WATCHERS = "WatchTasks streams"
    TOOL_STREAMS = "health Watch and reflection streams"


_REFUSAL_REASONS = {
    Pool.CALLS: "TOO_MANY_CALLS",
    Pool.WATCHERS: "TOO_MANY_WATCHERS",
    Pool.TOOL_STREAMS: "TOO_MANY_STREAMS",
}
# Reasons of other codes that are the server's doing: it is at capacity.
SERVER_REASONS = frozenset(_REFUSAL_REASONS.values())


def pool_of(method: str) -> Pool | None:
    if method == HEALTH_CHECK:
        return None  # never refused
    if method.startswith(_TOOL_PREFIXES):
        return Pool.TOOL_STREAMS
    if method == WATCH_TASKS:
        return Pool.WATCHERS
    return Pool.CALLS


@dataclass(frozen=True)
class CallLimits:
    max_calls: int = 1000  # TaskService calls in flight
    max_watchers: int = 1000  # WatchTasks streams open
    max_tool_streams: int = 100  # health Watch and reflection streams open
    tool_stream_idle_seconds: float = 300.0


class CallGate:
    """Admission counts and the drain signal, shared by every call of one server."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._bounds = {
            Pool.CALLS: limits.max_calls,
            Pool.WATCHERS: limits.max_watchers,
            Pool.TOOL_STREAMS: limits.max_tool_streams,
        }
        self.in_flight = dict.fromkeys(Pool, 0)
        self.started = 0  # calls the pipeline has picked up, ever
        self.draining = asyncio.Event()
        # The timeouts of calls waiting for their request message.
        self.reading: set[asyncio.Timeout] = set()

    def admit(self, pool: Pool) -> None:
        if self.in_flight[pool] >= self._bounds[pool]:
            raise ResourceExhausted(
                f"too many {pool.value} in flight ({self._bounds[pool]}); retry later",
                reason=_REFUSAL_REASONS[pool],
            )
        self.in_flight[pool] += 1

    def release(self, pool: Pool) -> None:
        self.in_flight[pool] -= 1

    def drain(self) -> None:
        """Every stream ends (UNAVAILABLE), and a call still waiting for its
        request message gets DRAIN_REQUEST_GRACE_SECONDS for it."""
        self.draining.set()
        soon = asyncio.get_running_loop().time() + DRAIN_REQUEST_GRACE_SECONDS
        for timeout in self.reading:
            when = timeout.when()
            if when is None or when > soon:
                timeout.reschedule(soon)


@dataclass
class StreamControl:
    """What a server-streaming method's code may tell the pipeline about its
    stream (taskservice.calls.current_stream, set while the method runs)."""

    # Set to end the stream with that status at once, even while a write is
    # waiting for a client that does not read.
    ended: asyncio.Future[ServiceError] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # How long the message in flight may take to reach the client after end()
    # before the status is sent (it then follows that message).
    grace_seconds: float = 1.0
    # ErrorInfo metadata for the status the stream ends with (drain, end()),
    # given the last message sent: WatchTasks puts its resume token there.
    status_metadata: Callable[[Any], dict[str, str]] = lambda last_sent: {}

    def end(self, error: ServiceError) -> None:
        if not self.ended.done():
            self.ended.set_result(error)


current_stream: contextvars.ContextVar[StreamControl | None] = contextvars.ContextVar(
    "current_stream", default=None
)


class _Call:
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

    def __init__(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
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
        self.last_sent: Any = None
        self.left = False
        self.span: CallSpan | None = None


def _size(message: Any) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


def _decode(decode: Callable[[bytes], Any] | None, raw: bytes, field: str) -> Any:
    if len(raw) > MAX_REQUEST_BYTES:
        raise ResourceExhausted(
            f"{field} is {len(raw)} bytes, over the limit of {MAX_REQUEST_BYTES} for one message",
            reason="REQUEST_TOO_LARGE",
            metadata={"limit_bytes": str(MAX_REQUEST_BYTES), "size_bytes": str(len(raw))},
        )
    if decode is None:
        return raw
    try:
        return decode(raw)
    except Exception:  # DecodeError and friends: the bytes are not the message
        raise InvalidArgument(
            [(field, "is not a valid protobuf message of the method's request type")],
            reason="MALFORMED_REQUEST",
        ) from None


def _abort_code(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN"


def _deadline_passed(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the caller's deadline has passed, or is about to pass on the
    server's clock: the caller's deadline runs from when it sent the call,
    the server's from when the call arrived, so the caller's cancel at its
    deadline reaches the server with a little of the server's deadline left
    (2 to 8 ms measured on loopback, tests/test_incident.py; more behind a
    front end). A caller that cancels within DEADLINE_SLACK_SECONDS of its
    deadline is logged as DEADLINE_EXCEEDED."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_SECONDS


def _fault(code: str, reason: str) -> str:
    """Whose doing a status is: `none` for OK; `server` for a server-side code
    the caller did not cause, and for a refusal at capacity (TOO_MANY_*);
    else `caller`."""
    if code == "OK":
        return "none"
    if code in SERVER_CODES:
        return "caller" if reason in CALLER_REASONS else "server"
    return "server" if reason in SERVER_REASONS else "caller"


def time_left(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    """Seconds left of the caller's deadline, at most MAX_STORE_CALL_SECONDS."""
    remaining = context.time_remaining()
    if remaining is None:
        return MAX_STORE_CALL_SECONDS
    return max(0.0, min(remaining, MAX_STORE_CALL_SECONDS))


class CallPipeline:
    """Wraps method handlers so that each call goes through the steps above."""

    def __init__(
        self,
        gate: CallGate,
        verifier: IdTokenVerifier | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.gate = gate
        self.verifier = verifier
        self.telemetry = telemetry

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        decode = handler.request_deserializer
        encode = handler.response_serializer
        pool = pool_of(method)
        # Methods with one request message are registered with grpc.aio as
        # client-streaming ones and read their message here: grpc.aio's own
        # unary-request path, given a call that half-closes without a message
        # (HEADERS with END_STREAM, no DATA), returns without a status and
        # leaves the call open until the client goes away, uncounted and
        # holding its memory and the shutdown (_handle_unary_unary_rpc and
        # _handle_unary_stream_rpc in grpc's
        # src/python/grpcio/grpc/_cython/_cygrpc/aio/server.pyx.pxi take the
        # missing message for a cancel; grpc 1.85).
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.unary_unary, decode, method, pool), response_serializer=encode
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._client_stream(handler.stream_unary, decode, method, pool),
                response_serializer=encode,
            )
        if handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._server_stream(handler.unary_stream, decode, method, pool, False),
                response_serializer=encode,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._server_stream(handler.stream_stream, decode, method, pool, True),
            response_serializer=encode,
        )

    # -- the steps shared by every kind of call --------------------------------

    async def _enter(self, call: _Call, pool: Pool | None, one_request: bool) -> None:
        """The trace, the request message of a method that takes one, then
        authentication and admission."""
        self.gate.started += 1
        context = call.context
        caller = parse_trace(context.invocation_metadata())
        if self.telemetry is not None:
            call.span = self.telemetry.start_call(
                call.method,
                caller,
                traced=not call.method.startswith(_TOOL_PREFIXES),
                original=call.requested,
            )
            caller = call.span.log_trace
        current_trace.set(caller)
        if one_request:
            call.request = await self._read_request(call)
        if pool in (Pool.CALLS, Pool.WATCHERS) and self.verifier is not None:
            authorizations = [
                value
                for key, value in context.invocation_metadata() or ()
                if key == "authorization" and isinstance(value, str)
            ]
            await self.verifier.verify(authorizations, time_left(context))
        if pool is not None:
            self.gate.admit(pool)
            call.admitted = pool

    async def _fail(self, call: _Call, exc: Exception) -> NoReturn:
        """Ends the call with exc's status (raises grpc.aio.AbortError). The
        call's slot and access line do not wait for the status to be sent:
        behind a message that a client does not read, it may never be. When
        it has not gone out within STATUS_SEND_SECONDS, or cannot go out, the
        handler gives up on it (CancelledError, which grpc.aio takes
        quietly)."""
        if isinstance(exc, grpc.aio.AbortError):  # a handler aborted by itself
            call.code = _abort_code(call.context)
            raise exc
        err = as_service_error(exc, call.method)
        call.code = err.code.name
        call.reason = err.reason
        if call.code == "CANCELLED":  # a handler that saw the call end: which way?
            self._cancelled(call)
        self._leave(call)
        try:
            await asyncio.wait_for(abort(call.context, err), STATUS_SEND_SECONDS)
        except grpc.aio.AbortError:
            raise  # sent
        except Exception:
            # Not sent in time, or not at all: the client went away while
            # the status waited (grpc.aio's ExecuteBatchError, which it logs
            # as an error unless it has already seen the client go).
            raise asyncio.CancelledError from None

    @staticmethod
    def _cancelled(call: _Call) -> None:
        """The code of a call grpc.aio cancelled: its deadline passed, or the
        caller cancelled it."""
        if _deadline_passed(call.context):
            call.code = "DEADLINE_EXCEEDED"
            if call.waiting_on_caller:
                call.reason = "CALLER_TOO_SLOW"
            elif call.messages_out is not None:  # how long to listen: the caller's choice
                call.reason = "STREAM_DEADLINE"
            else:
                call.reason = "DEADLINE_PASSED"
        else:
            call.code = "CANCELLED"
            call.reason = ""

    def _release(self, call: _Call) -> None:
        if call.admitted is not None:
            self.gate.release(call.admitted)
            call.admitted = None

    def _leave(self, call: _Call) -> None:
        if call.left:
            return
        call.left = True
        self._release(call)
        if call.span is not None and self.telemetry is not None:
            self.telemetry.end_call(
                call.span,
                call.code,
                time.perf_counter() - call.started,
                call.messages_in,
                call.messages_out,
                _fault(call.code, call.reason),
            )
        _access_line(call)

    async def _read_request(self, call: _Call) -> bytes:
        """The one request message of a unary-request method: INVALID_ARGUMENT
        when the caller half-closed without one; DEADLINE_EXCEEDED when none
        came within REQUEST_MESSAGE_SECONDS; UNAVAILABLE when the server
        started draining and none came DRAIN_REQUEST_GRACE_SECONDS later."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(REQUEST_MESSAGE_SECONDS) as timeout:
                if self.gate.draining.is_set():
                    timeout.reschedule(loop.time() + DRAIN_REQUEST_GRACE_SECONDS)
                self.gate.reading.add(timeout)
                try:
                    raw = await call.context.read()
                finally:
                    self.gate.reading.discard(timeout)
        except TimeoutError:
            if self.gate.draining.is_set():
                raise Unavailable(
                    "the server is shutting down; reconnect to another instance",
                    reason="SERVER_DRAINING",
                ) from None
            raise DeadlineExceeded(
                f"no request message came within {REQUEST_MESSAGE_SECONDS:g} s",
                reason="REQUEST_IDLE",
            ) from None
        if raw is grpc.aio.EOF:
            raise InvalidArgument(
                [("request", "is missing: the call ended without a request message")],
                reason="MISSING_REQUEST",
            )
        call.request_bytes = len(raw)
        return bytes(raw)

    async def _serve(
        self,
        call: _Call,
        pool: Pool | None,
        body: Callable[[], Awaitable[T]],
        one_request: bool = False,
    ) -> T:
        """The steps around every call's body: trace, the request message when
        the method takes one, auth, admission, and whatever happens, its
        status and access line."""
        token = current_trace.set(None)
        try:
            await self._enter(call, pool, one_request)
            result = await body()
            call.code = "OK"
            return result
        except asyncio.CancelledError:
            self._cancelled(call)
            raise
        except Exception as exc:
            await self._fail(call, exc)
        finally:
            self._leave(call)
            current_trace.reset(token)

    def unknown_methods(self) -> grpc.GenericRpcHandler:
        """A catch-all for methods the server does not have: UNIMPLEMENTED,
        through the pipeline (the request is never read)."""
        return _UnknownMethods(self)

    def _unknown(self, requested: str) -> grpc.RpcMethodHandler[Any, Any]:
        async def handle(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            call = _Call("/" + UNKNOWN_METHOD, context)
            call.requested = requested[:200]

            async def body() -> None:
                raise Unimplemented(
                    f"this server has no method {call.requested}", metadata={"method": requested}
                )

            await self._serve(call, None, body)

        return grpc.stream_stream_rpc_method_handler(handle)

    # -- the four kinds of call --------------------------------------------------

    def _unary(self, behavior: Any, decode: Any, method: str, pool: Pool | None) -> Any:
        async def handle(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(method, context)

            async def body() -> Any:
                response = await behavior(_decode(decode, call.request, "request"), context)
                call.response_bytes = _size(response)
                return response

            return await self._serve(call, pool, body, one_request=True)

        return handle

    def _client_stream(self, behavior: Any, decode: Any, method: str, pool: Pool | None) -> Any:
        async def handle(
            raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            call = _Call(method, context)
            call.messages_in = 0

            async def body() -> Any:
                response = await behavior(self._decoded(raw_requests, decode, call), context)
                call.response_bytes = _size(response)
                return response

            return await self._serve(call, pool, body)

        return handle

    def _server_stream(
        self, behavior: Any, decode: Any, method: str, pool: Pool | None, client_streams: bool
    ) -> Any:
        idle = self.gate.limits.tool_stream_idle_seconds if pool is Pool.TOOL_STREAMS else None

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            call = _Call(method, context)
            call.messages_out = 0

            async def body() -> None:
                control = StreamControl()
                token = current_stream.set(control)
                try:
                    if client_streams:
                        call.messages_in = 0
                        responses = behavior(self._decoded(request, decode, call), context)
                    else:
                        responses = behavior(_decode(decode, call.request, "request"), context)
                    await self._pump(responses, call, idle, control)
                finally:
                    current_stream.reset(token)

            await self._serve(call, pool, body, one_request=not client_streams)

        return handle

    async def _decoded(
        self, raw_requests: AsyncIterator[bytes], decode: Any, call: _Call
    ) -> AsyncIterator[Any]:
        iterator = aiter(raw_requests)
        while True:
            # Left set if the call is cancelled meanwhile: its deadline then
            # passed while the caller was the one being waited for.
            call.waiting_on_caller = True
            try:
                raw = await anext(iterator)
            except StopAsyncIteration:
                # grpc.aio ends the requests, too, when the deadline passes
                # while it waits for the next one.
                call.waiting_on_caller = _deadline_passed(call.context)
                return
            call.waiting_on_caller = False
            call.request_bytes += len(raw)
            message = _decode(decode, raw, f"requests[{call.messages_in}]")
            call.messages_in = (call.messages_in or 0) + 1
            yield message

    async def _pump(
        self, responses: Any, call: _Call, idle: float | None, control: StreamControl
    ) -> None:
        """Writes the stream's messages until it ends, it is idle for `idle`
        seconds, its code ends it (control.end), or the server starts
        draining (then UNAVAILABLE: reconnect). A stream ended so frees its
        slot at once; the message in flight, if any, is given
        control.grace_seconds (DRAIN_WRITE_GRACE_SECONDS when draining) to
        reach the client before the status is sent. The status can only
        reach the client after that message (a stream's frames arrive in
        order), so what it says of the last message (status_metadata) is
        about the last one handed to gRPC, whether or not it has arrived."""
        stop = asyncio.Event()
        writing = asyncio.ensure_future(_write_all(responses, call, idle, stop))
        draining = asyncio.ensure_future(self.gate.draining.wait())
        try:
            await asyncio.wait(
                (writing, draining, control.ended), return_when=asyncio.FIRST_COMPLETED
            )
            if control.ended.done():
                error, grace = control.ended.result(), control.grace_seconds
            elif draining.done():
                error = Unavailable(
                    "the server is shutting down; reconnect to another instance",
                    reason="SERVER_DRAINING",
                )
                grace = DRAIN_WRITE_GRACE_SECONDS
            else:
                writing.result()  # the stream ended by itself
                return
            self._release(call)  # ended: its slot is free, whatever the client reads
            stop.set()  # the write in flight, if any, may finish; then no more
            await asyncio.wait((writing,), timeout=grace)
            error.metadata.update(control.status_metadata(call.last_sent))
            raise error
        finally:
            draining.cancel()
            if not writing.done():
                writing.cancel()
            # Its outcome is this stream's status already (the error raised
            # above): retrieve it, or asyncio reports it as never retrieved.
            await asyncio.gather(writing, return_exceptions=True)


async def _write_all(responses: Any, call: _Call, idle: float | None, stop: asyncio.Event) -> None:
    """Writes until the stream ends or `stop` is set (then after the write in
    flight, if any)."""
    iterator = aiter(responses)
    stopped = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[Any] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait(
                (following, stopped), timeout=idle, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                following.cancel()  # and let it end before the iterator is closed
                await asyncio.gather(following, return_exceptions=True)
                raise Unavailable(
                    f"the stream was idle for {idle:g} s and was ended; open a new one",
                    reason="STREAM_IDLE",
                )
            if following not in done:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
                return
            try:
                message = following.result()
            except StopAsyncIteration:
                return
            call.last_sent = message  # gRPC has it once the write starts
            try:
                await call.context.write(message)
            except ExecuteBatchError:
                # gRPC could not send it: the client reset the stream or went
                # away while the message waited. The call is over, as if it
                # were cancelled (and grpc.aio takes that quietly).
                raise asyncio.CancelledError from None
            call.messages_out = (call.messages_out or 0) + 1
            call.response_bytes += _size(message)
            if stop.is_set():
                return
    finally:
        stopped.cancel()
        if following is not None:
            # Cancelled while waiting for the next message (the caller's
            # deadline or cancel), which may have come meanwhile: end that
            # wait before closing the iterator, and retrieve its outcome, or
            # asyncio logs it as never retrieved.
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


def _access_line(call: _Call) -> None:
    code = call.code
    if code in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
        level = logging.ERROR
    elif call.method.startswith(_TOOL_PREFIXES):
        level = logging.DEBUG  # probes and tools: every few seconds, all alike
    else:
        level = logging.INFO
    if not log.isEnabledFor(level):
        return
    name = metric_name(call.method)
    fields: dict[str, Any] = {
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
    fields["fault"] = _fault(code, call.reason)
    if call.reason:
        fields["reason"] = call.reason
    if call.requested:
        fields["requested_method"] = call.requested
    log_fields(log, level, f"{call.requested or name} {code}", fields)


def metric_name(method: str) -> str:
    """A method as gRFC A66 names it in metrics, and the access line too."""
    return method.removeprefix("/")


class _UnknownMethods(grpc.GenericRpcHandler):
    def __init__(self, pipeline: CallPipeline) -> None:
        self._pipeline = pipeline

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        return self._pipeline._unknown(method if isinstance(method, str) else repr(method))


class PipelineRegistrar:
    """Stands in for the grpc.aio server in generated add_*_to_server functions:

    add_TaskServiceServicer_to_server(servicer, PipelineRegistrar(server, pipeline))
    """

    def __init__(self, server: grpc.aio.Server, pipeline: CallPipeline) -> None:
        self._server = server
        self._pipeline = pipeline

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same methods arrive through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {
            name: self._pipeline.wrap(h, f"/{service}/{name}") for name, h in handlers.items()
        }
        self._server.add_registered_method_handlers(service, wrapped)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
