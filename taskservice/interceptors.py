"""What every call passes through: decoding, access log, trace.

- Decoding: requests arrive as bytes and are parsed here, so a message that is
  not valid protobuf (corrupt wire format, invalid UTF-8 in a string) gets
  INVALID_ARGUMENT instead of grpc's UNKNOWN with parser text.
- Access log: one structured line per RPC after it ends: the method, the gRPC
  code, latency, the peer, the request and response sizes (and the message
  count of a client stream).
- Trace: the caller's trace (W3C `traceparent` or `x-cloud-trace-context`) is
  bound to every log line written while the call runs.
Payloads and credentials are never logged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from taskservice.errors import InvalidArgument
from taskservice.logging import CallTrace, current_trace, log_fields

log = logging.getLogger("taskservice.access")

_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/(\d+))?(?:;o=([01]))?")


def parse_trace(metadata: Any) -> CallTrace | None:
    """The caller's trace from `traceparent` (preferred) or `x-cloud-trace-context`."""
    traceparent = cloud = None
    for key, value in metadata or ():
        if key == "traceparent":
            traceparent = value
        elif key == "x-cloud-trace-context":
            cloud = value
    if isinstance(traceparent, str):
        m = _TRACEPARENT.fullmatch(traceparent.strip())
        if m and m.group(1) != "0" * 32:
            return CallTrace(m.group(1), m.group(2), m.group(3) == "01")
    if isinstance(cloud, str):
        m = _CLOUD_TRACE.fullmatch(cloud.strip())
        if m:
            span = format(int(m.group(2)), "016x") if m.group(2) else None
            return CallTrace(m.group(1).lower(), span, m.group(3) == "1")
    return None


class Instrumented:
    """Stands in for the grpc.aio server in the generated add_*_to_server
    functions and registers every method already wrapped (decoding, access
    log, trace): no per-call interceptor machinery, and registered methods
    keep grpc's fast pre-registered path.

        add_TaskServiceServicer_to_server(servicer, Instrumented(server))
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same methods arrive through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {name: _wrap(h, f"/{service}/{name}") for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    decode = handler.request_deserializer
    if handler.unary_unary is None and handler.stream_unary is None:
        return handler  # server streams (health Watch, reflection) are not logged
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, decode, method),
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_unary_rpc_method_handler(
        _client_stream(handler.stream_unary, decode, method),
        response_serializer=handler.response_serializer,
    )


def _size(message: Any) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if error is None:
        return "OK"
    if isinstance(error, BaseException) and type(error).__name__ == "CancelledError":
        return "CANCELLED"
    return "UNKNOWN"


def _emit(
    method: str,
    context: grpc.aio.ServicerContext[Any, Any],
    started: float,
    error: BaseException | None,
    request_bytes: int,
    response: Any,
    messages: int | None,
) -> None:
    code = _code(context, error)
    if code in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
        level = logging.ERROR
    elif method.startswith(_QUIET_PREFIXES):
        level = logging.DEBUG  # health probes and reflection: every few seconds, all alike
    else:
        level = logging.INFO
    if not log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "grpc.method": method,
        "grpc.code": code,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        "peer": context.peer(),
        "request_bytes": request_bytes,
        "response_bytes": _size(response),
    }
    if messages is not None:
        fields["request_messages"] = messages
    log_fields(log, level, f"{method} {code}", fields)


def _decode(decode: Any, raw: bytes, field: str) -> Any:
    if decode is None:
        return raw
    try:
        return decode(raw)
    except Exception:  # DecodeError and friends: the bytes are not the message
        raise InvalidArgument(
            [(field, "is not a valid protobuf message of the method's request type")],
            reason="MALFORMED_REQUEST",
        ) from None


def _unary(behavior: Any, decode: Any, method: str) -> Any:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = current_trace.set(parse_trace(context.invocation_metadata()))
        started = time.perf_counter()
        error: BaseException | None = None
        response = None
        request_bytes = len(raw)
        try:
            try:
                request = _decode(decode, raw, "request")
            except InvalidArgument as bad:
                status = bad.to_grpc_status()
                await context.abort(status.code, status.details, status.trailing_metadata)
            response = await behavior(request, context)
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            _emit(method, context, started, error, request_bytes, response, None)
            current_trace.reset(token)

    return handle


def _client_stream(behavior: Any, decode: Any, method: str) -> Any:
    async def handle(
        request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        token = current_trace.set(parse_trace(context.invocation_metadata()))
        started = time.perf_counter()
        counts = [0, 0]  # messages, bytes

        async def counted() -> AsyncIterator[Any]:
            async for raw in request_iterator:
                counts[1] += len(raw)
                message = _decode(decode, raw, f"requests[{counts[0]}]")
                counts[0] += 1
                yield message

        error: BaseException | None = None
        response = None
        try:
            response = await behavior(counted(), context)
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            _emit(method, context, started, error, counts[1], response, counts[0])
            current_trace.reset(token)

    return handle
