"""What every call passes through, from the moment gRPC hands it over until its
access line is written.

In order, for every method of every service (TaskService, health, reflection):

1. The caller's trace is read from the metadata (tracing.parse_trace; a
   malformed header is ignored) and bound to the call's log lines. With
   telemetry on (taskservice.observe.telemetry), the call's span starts here, a child
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
5. The handler runs. A ServiceError becomes its status (taskservice.api.status);
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
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeAlias, TypeVar, cast

import grpc
from google.protobuf.message import Message

from taskservice.api._access import (
    UNKNOWN_METHOD,
    CallRecord,
    Context,
    access_line,
    deadline_passed,
    fault,
    size_of,
)
from taskservice.api._admission import (
    DRAIN_REQUEST_GRACE_SECONDS,
    TOOL_PREFIXES,
    CallGate,
    CallLimits,
    Pool,
    pool_of,
)
from taskservice.api._stream import (
    Decode,
    Request,
    StreamControl,
    current_stream,
    decode_message,
    decoded,
    pump,
)
from taskservice.api.auth import IdTokenVerifier
from taskservice.api.status import abort, as_service_error
from taskservice.domain.errors import (
    DeadlineExceeded,
    InvalidArgument,
    Unavailable,
    Unimplemented,
)
from taskservice.domain.limits import (
    DRAIN_STATUS_SECONDS,
    MAX_STORE_CALL_SECONDS,
    REQUEST_MESSAGE_SECONDS,
    STATUS_SEND_SECONDS,
)
from taskservice.observe.tracing import current_trace, parse_trace

if TYPE_CHECKING:
    from taskservice.observe.telemetry import Telemetry


__all__ = [
    "DRAIN_STATUS_SECONDS",
    "STATUS_SEND_SECONDS",
    "CallGate",
    "CallLimits",
    "CallPipeline",
    "PipelineRegistrar",
    "Pool",
    "StreamControl",
    "current_stream",
    "time_left",
]

T = TypeVar("T")
# The method handlers the pipeline wraps (grpc's stubs type a handler's
# behaviour as the sync API's; grpc.aio's are coroutine functions and async
# generators, taking the request message and the call's context).
Handler: TypeAlias = "grpc.RpcMethodHandler[Message, Message]"  # not generic at runtime
UnaryBehavior: TypeAlias = Callable[[Request, Context], Awaitable[Message]]
ClientStreamBehavior: TypeAlias = Callable[[AsyncIterator[Request], Context], Awaitable[Message]]
ServerStreamBehavior: TypeAlias = Callable[[Request, Context], AsyncIterable[Message]]
BidiStreamBehavior: TypeAlias = Callable[[AsyncIterator[Request], Context], AsyncIterable[Message]]
# The handlers the pipeline registers in their place: they read the raw requests.
_UnaryRequestHandler: TypeAlias = Callable[[AsyncIterator[bytes], Context], Awaitable[Message]]
_StreamHandler: TypeAlias = Callable[[AsyncIterator[bytes], Context], Awaitable[None]]


def _abort_code(context: Context) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN"


def time_left(context: Context) -> float:
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

    def wrap(self, handler: Handler, method: str) -> Handler:
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
                self._unary(cast(UnaryBehavior, handler.unary_unary), decode, method, pool),
                response_serializer=encode,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._client_stream(
                    cast(ClientStreamBehavior, handler.stream_unary), decode, method, pool
                ),
                response_serializer=encode,
            )
        if handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._server_stream(
                    cast(ServerStreamBehavior, handler.unary_stream), decode, method, pool, False
                ),
                response_serializer=encode,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._server_stream(
                cast(BidiStreamBehavior, handler.stream_stream), decode, method, pool, True
            ),
            response_serializer=encode,
        )

    # -- the steps shared by every kind of call --------------------------------

    async def _enter(self, call: CallRecord, pool: Pool | None, one_request: bool) -> None:
        """The trace, the request message of a method that takes one, then
        authentication and admission."""
        self.gate.started += 1
        context = call.context
        caller = parse_trace(context.invocation_metadata())
        if self.telemetry is not None:
            call.span = self.telemetry.start_call(
                call.method,
                caller,
                traced=not call.method.startswith(TOOL_PREFIXES),
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

    async def _fail(self, call: CallRecord, exc: Exception) -> NoReturn:
        """Ends the call with exc's status (raises grpc.aio.AbortError). The
        call's slot and access line do not wait for the status to be sent:
        behind a message that a client does not read, it may never be. When
        it has not gone out within STATUS_SEND_SECONDS (DRAIN_STATUS_SECONDS
        once the server drains), or cannot go out, the handler gives up on it
        (CancelledError, which grpc.aio takes quietly)."""
        if isinstance(exc, grpc.aio.AbortError):  # a handler aborted by itself
            call.code = _abort_code(call.context)
            raise exc
        err = as_service_error(exc, call.method)
        call.code = err.code.name
        call.reason = err.reason
        if call.code == "CANCELLED":  # a handler that saw the call end: which way?
            self._cancelled(call)
        self._leave(call)
        wait = DRAIN_STATUS_SECONDS if self.gate.draining.is_set() else STATUS_SEND_SECONDS
        try:
            await asyncio.wait_for(abort(call.context, err), wait)
        except grpc.aio.AbortError:
            raise  # sent
        except Exception:
            # Not sent in time, or not at all: the client went away while
            # the status waited (grpc.aio's ExecuteBatchError, which it logs
            # as an error unless it has already seen the client go).
            raise asyncio.CancelledError from None

    @staticmethod
    def _cancelled(call: CallRecord) -> None:
        """The code of a call grpc.aio cancelled: its deadline passed, or the
        caller cancelled it."""
        if deadline_passed(call.context):
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

    def _release(self, call: CallRecord) -> None:
        if call.admitted is not None:
            self.gate.release(call.admitted)
            call.admitted = None

    def _leave(self, call: CallRecord) -> None:
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
                fault(call.code, call.reason),
            )
        access_line(call)

    async def _read_request(self, call: CallRecord) -> bytes:
        """The one request message of a unary-request method: INVALID_ARGUMENT
        when the caller half-closed without one; DEADLINE_EXCEEDED when none
        came within REQUEST_MESSAGE_SECONDS; UNAVAILABLE when the server
        started draining and none came DRAIN_REQUEST_GRACE_SECONDS later."""
        loop = asyncio.get_running_loop()
        task = cast("asyncio.Task[object]", asyncio.current_task())
        draining = self.gate.draining.is_set()
        wait = DRAIN_REQUEST_GRACE_SECONDS if draining else REQUEST_MESSAGE_SECONDS
        reading = self.gate.reading
        cancelling = task.cancelling()
        reading.add(task, loop.time() + wait, loop)
        try:
            # bytes, or grpc.aio.EOF (which grpc's stubs leave out of read()'s type)
            raw: object = await call.context.read()
        except asyncio.CancelledError:
            if task not in reading.expired or task.uncancel() > cancelling:
                raise  # not (only) the deadline's cancel
            if self.gate.draining.is_set():
                raise Unavailable(
                    "the server is shutting down; reconnect to another instance",
                    reason="SERVER_DRAINING",
                ) from None
            raise DeadlineExceeded(
                f"no request message came within {REQUEST_MESSAGE_SECONDS:g} s",
                reason="REQUEST_IDLE",
            ) from None
        finally:
            reading.discard(task)
        if raw is grpc.aio.EOF:
            raise InvalidArgument(
                [("request", "is missing: the call ended without a request message")],
                reason="MISSING_REQUEST",
            )
        request = cast(bytes, raw)
        call.request_bytes = len(request)
        return bytes(request)

    async def _serve(
        self,
        call: CallRecord,
        pool: Pool | None,
        body: Callable[[], Awaitable[T]],
        one_request: bool = False,
    ) -> T:
        """The steps around every call's body: trace, the request message when
        the method takes one, auth, admission, and whatever happens, its
        status and access line."""
        token = current_trace.set(None)
        self.gate.running += 1
        # grpc's stubs type the callback as a class of their own, not a callable.
        call.context.add_done_callback(self._finished)  # type: ignore[arg-type]
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

    def _finished(self, _: Context) -> None:
        """grpc.aio's call is over: its status was sent, or given up."""
        self.gate.running -= 1

    def unknown_methods(self) -> grpc.GenericRpcHandler:
        """A catch-all for methods the server does not have: UNIMPLEMENTED,
        through the pipeline (the request is never read)."""
        return _UnknownMethods(self)

    def _unknown(self, requested: str) -> Handler:
        async def handle(requests: AsyncIterator[bytes], context: Context) -> None:
            call = CallRecord("/" + UNKNOWN_METHOD, context)
            call.requested = requested[:200]

            async def body() -> None:
                raise Unimplemented(
                    f"this server has no method {call.requested}", metadata={"method": requested}
                )

            await self._serve(call, None, body)

        return grpc.stream_stream_rpc_method_handler(handle)

    # -- the four kinds of call --------------------------------------------------

    def _unary(
        self, behavior: UnaryBehavior, decode: Decode, method: str, pool: Pool | None
    ) -> _UnaryRequestHandler:
        async def handle(_: AsyncIterator[bytes], context: Context) -> Message:
            call = CallRecord(method, context)

            async def body() -> Message:
                response = await behavior(decode_message(decode, call.request, "request"), context)
                call.response_bytes = size_of(response)
                return response

            return await self._serve(call, pool, body, one_request=True)

        return handle

    def _client_stream(
        self, behavior: ClientStreamBehavior, decode: Decode, method: str, pool: Pool | None
    ) -> _UnaryRequestHandler:
        async def handle(raw_requests: AsyncIterator[bytes], context: Context) -> Message:
            call = CallRecord(method, context)
            call.messages_in = 0

            async def body() -> Message:
                response = await behavior(decoded(raw_requests, decode, call), context)
                call.response_bytes = size_of(response)
                return response

            return await self._serve(call, pool, body)

        return handle

    def _server_stream(
        self,
        behavior: ServerStreamBehavior | BidiStreamBehavior,
        decode: Decode,
        method: str,
        pool: Pool | None,
        client_streams: bool,
    ) -> _StreamHandler:
        idle = self.gate.limits.tool_stream_idle_seconds if pool is Pool.TOOL_STREAMS else None

        async def handle(request: AsyncIterator[bytes], context: Context) -> None:
            call = CallRecord(method, context)
            call.messages_out = 0

            async def body() -> None:
                control = StreamControl()
                token = current_stream.set(control)
                try:
                    if client_streams:
                        call.messages_in = 0
                        bidi = cast(BidiStreamBehavior, behavior)  # as client_streams says
                        responses = bidi(decoded(request, decode, call), context)
                    else:
                        one = cast(ServerStreamBehavior, behavior)  # as client_streams says
                        responses = one(decode_message(decode, call.request, "request"), context)
                    await pump(
                        responses,
                        call,
                        idle,
                        control,
                        self.gate.draining,
                        lambda: self._release(call),
                    )
                finally:
                    current_stream.reset(token)

            await self._serve(call, pool, body, one_request=not client_streams)

        return handle


class _UnknownMethods(grpc.GenericRpcHandler):
    def __init__(self, pipeline: CallPipeline) -> None:
        self._pipeline = pipeline

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        return self._pipeline._unknown(method if isinstance(method, str) else repr(method))


class PipelineRegistrar:
    """Stands in for the grpc.aio server in generated add_*_to_server functions:

    add_TaskServiceServicer_to_server(servicer, PipelineRegistrar(server, pipeline))
    """

    def __init__(self, server: grpc.aio.Server, pipeline: CallPipeline) -> None:
        self._server = server
        self._pipeline = pipeline

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # the same methods arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        wrapped = {
            name: self._pipeline.wrap(h, f"/{service}/{name}") for name, h in handlers.items()
        }
        self._server.add_registered_method_handlers(service, wrapped)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
