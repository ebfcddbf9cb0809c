"""What every call passes through, from the moment gRPC hands it over until its
access line is written.

In order, for every method of every service (TaskService, health, reflection):

1. The caller's trace is read from the metadata (tracing.parse_trace; a
   malformed header is ignored) and bound to the call's log lines.
2. Authentication, when configured, for TaskService methods (health and
   reflection stay open for probes and tools).
3. Admission. TaskService calls and the long-lived health Watch and
   reflection streams are counted apart, each against its own bound (beyond
   it: RESOURCE_EXHAUSTED at once), so neither can starve the other, and calls
   refused by auth never take a slot. Health Check is never refused: it is the
   liveness probe, and answers from memory.
4. The request bytes are decoded here, so a message that is not valid
   protobuf gets INVALID_ARGUMENT rather than gRPC's UNKNOWN with parser text.
5. The handler runs. A ServiceError becomes its status (taskservice.status);
   a timeout, DEADLINE_EXCEEDED; anything else a generic INTERNAL whose error
   id is logged with the stack trace.
6. Server streams are written from here: a stream idle longer than its limit
   ends, and when the server starts draining every stream ends at once with
   UNAVAILABLE, so open streams cannot hold the shutdown.
7. One access line per call, refused or not: method, code, latency, peer,
   request and response sizes, and message counts for streams. Payloads and
   credentials are never logged.

PipelineRegistrar stands in for the grpc.aio server in the generated
add_*_to_server functions and registers every method already wrapped: no
per-call interceptor machinery, and registered methods keep gRPC's fast
pre-registered path.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from taskservice.auth import IdTokenVerifier
from taskservice.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from taskservice.jsonlog import log_fields
from taskservice.limits import MAX_STORE_CALL_SECONDS
from taskservice.status import abort, as_service_error
from taskservice.tracing import current_trace, parse_trace

log = logging.getLogger("taskservice.access")
T = TypeVar("T")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_TOOL_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Pool(enum.Enum):
    """What a call is counted against."""

    CALLS = "TaskService calls"
    TOOL_STREAMS = "health Watch and reflection streams"


def pool_of(method: str) -> Pool | None:
    if method == HEALTH_CHECK:
        return None  # never refused
    if method.startswith(_TOOL_PREFIXES):
        return Pool.TOOL_STREAMS
    return Pool.CALLS


@dataclass(frozen=True)
class CallLimits:
    max_calls: int = 1000  # TaskService calls in flight
    max_tool_streams: int = 100  # health Watch and reflection streams open
    tool_stream_idle_seconds: float = 300.0


class CallGate:
    """Admission counts and the drain signal, shared by every call of one server."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._bounds = {Pool.CALLS: limits.max_calls, Pool.TOOL_STREAMS: limits.max_tool_streams}
        self.in_flight = dict.fromkeys(Pool, 0)
        self.draining = asyncio.Event()

    def admit(self, pool: Pool) -> None:
        if self.in_flight[pool] >= self._bounds[pool]:
            raise ResourceExhausted(
                f"too many {pool.value} in flight ({self._bounds[pool]}); retry later",
                reason="TOO_MANY_CALLS" if pool is Pool.CALLS else "TOO_MANY_STREAMS",
            )
        self.in_flight[pool] += 1

    def release(self, pool: Pool) -> None:
        self.in_flight[pool] -= 1


class _Call:
    """What the access line of one call reports."""

    __slots__ = (
        "admitted",
        "code",
        "context",
        "messages_in",
        "messages_out",
        "method",
        "request_bytes",
        "response_bytes",
        "started",
    )

    def __init__(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.code = "UNKNOWN"
        self.admitted: Pool | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self.messages_in: int | None = None
        self.messages_out: int | None = None


def _size(message: Any) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


def _decode(decode: Callable[[bytes], Any] | None, raw: bytes, field: str) -> Any:
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


def time_left(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    """Seconds left of the caller's deadline, at most MAX_STORE_CALL_SECONDS."""
    remaining = context.time_remaining()
    if remaining is None:
        return MAX_STORE_CALL_SECONDS
    return max(0.0, min(remaining, MAX_STORE_CALL_SECONDS))


class CallPipeline:
    """Wraps method handlers so that each call goes through the steps above."""

    def __init__(self, gate: CallGate, verifier: IdTokenVerifier | None = None) -> None:
        self.gate = gate
        self.verifier = verifier

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        decode = handler.request_deserializer
        encode = handler.response_serializer
        pool = pool_of(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, decode, method, pool), response_serializer=encode
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._client_stream(handler.stream_unary, decode, method, pool),
                response_serializer=encode,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._server_stream(handler.unary_stream, decode, method, pool, False),
                response_serializer=encode,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._server_stream(handler.stream_stream, decode, method, pool, True),
            response_serializer=encode,
        )

    # -- the steps shared by every kind of call --------------------------------

    async def _enter(self, call: _Call, pool: Pool | None) -> None:
        """Authentication, then admission."""
        context = call.context
        current_trace.set(parse_trace(context.invocation_metadata()))
        if pool is Pool.CALLS and self.verifier is not None:
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
        """Ends the call with exc's status (raises grpc.aio.AbortError)."""
        if isinstance(exc, grpc.aio.AbortError):  # a handler aborted by itself
            call.code = _abort_code(call.context)
            raise exc
        err = as_service_error(exc, call.method)
        call.code = err.code.name
        await abort(call.context, err)

    def _leave(self, call: _Call) -> None:
        if call.admitted is not None:
            self.gate.release(call.admitted)
        _access_line(call)

    async def _serve(self, call: _Call, pool: Pool | None, body: Callable[[], Awaitable[T]]) -> T:
        """The steps around every call's body: trace, auth, admission, and
        whatever happens, its status and access line."""
        token = current_trace.set(None)
        try:
            await self._enter(call, pool)
            result = await body()
            call.code = "OK"
            return result
        except asyncio.CancelledError:
            call.code = "CANCELLED"
            raise
        except Exception as exc:
            await self._fail(call, exc)
        finally:
            self._leave(call)
            current_trace.reset(token)

    # -- the four kinds of call --------------------------------------------------

    def _unary(self, behavior: Any, decode: Any, method: str, pool: Pool | None) -> Any:
        async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(method, context)

            async def body() -> Any:
                call.request_bytes = len(raw)
                response = await behavior(_decode(decode, raw, "request"), context)
                call.response_bytes = _size(response)
                return response

            return await self._serve(call, pool, body)

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
                if client_streams:
                    call.messages_in = 0
                    responses = behavior(self._decoded(request, decode, call), context)
                else:
                    call.request_bytes = len(request)
                    responses = behavior(_decode(decode, request, "request"), context)
                await self._pump(responses, call, idle)

            await self._serve(call, pool, body)

        return handle

    async def _decoded(
        self, raw_requests: AsyncIterator[bytes], decode: Any, call: _Call
    ) -> AsyncIterator[Any]:
        async for raw in raw_requests:
            call.request_bytes += len(raw)
            message = _decode(decode, raw, f"requests[{call.messages_in}]")
            call.messages_in = (call.messages_in or 0) + 1
            yield message

    async def _pump(self, responses: Any, call: _Call, idle: float | None) -> None:
        """Writes the stream's messages until it ends, it is idle for `idle`
        seconds, or the server starts draining (then UNAVAILABLE: reconnect)."""
        writing = asyncio.ensure_future(_write_all(responses, call, idle))
        draining = asyncio.ensure_future(self.gate.draining.wait())
        try:
            await asyncio.wait((writing, draining), return_when=asyncio.FIRST_COMPLETED)
        finally:
            draining.cancel()
            if not writing.done():
                writing.cancel()
                await asyncio.gather(writing, return_exceptions=True)
        if writing.cancelled():
            raise Unavailable(
                "the server is shutting down; reconnect to another instance",
                reason="SERVER_DRAINING",
            )
        writing.result()


async def _write_all(responses: Any, call: _Call, idle: float | None) -> None:
    iterator = aiter(responses)
    try:
        while True:
            deadline = asyncio.timeout(idle)
            try:
                async with deadline:
                    message = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise Unavailable(
                    f"the stream was idle for {idle:g} s and was ended; open a new one",
                    reason="STREAM_IDLE",
                ) from None
            await call.context.write(message)
            call.messages_out = (call.messages_out or 0) + 1
            call.response_bytes += _size(message)
    finally:
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
    fields: dict[str, Any] = {
        "grpc.method": call.method,
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
    log_fields(log, level, f"{call.method} {code}", fields)


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
