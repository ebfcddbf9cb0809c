"""Counts Firestore RPCs and billed documents on a store's real channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc


@dataclass
class CallCounter:
    """Counts Firestore RPCs (by method), documents returned (billed reads) and
    documents written by successful commits (billed writes), on the real channel."""

    calls: dict[str, int] = field(default_factory=dict)
    documents: int = 0
    written: int = 0

    def reset(self) -> None:
        self.calls.clear()
        self.documents = 0
        self.written = 0

    def count(self, details: Any) -> str:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name: str = method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return name

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [_CountUnary(self), _CountStream(self)]


class _CountUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, counter: CallCounter) -> None:
        self.counter = counter

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        name = self.counter.count(details)
        call = await continuation(details, request)
        if name in ("GetDocument", "Commit"):
            try:
                await call
            except grpc.aio.AioRpcError:
                return call
            if name == "GetDocument":
                self.counter.documents += 1
            else:
                self.counter.written += len(request.writes)
        return call


class _CountStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, counter: CallCounter) -> None:
        self.counter = counter

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.counter.count(details)
        call = await continuation(details, request)
        counter = self.counter

        async def counted() -> AsyncIterator[Any]:
            async for response in call:
                kind = "document" if response.DESCRIPTOR.name == "RunQueryResponse" else "found"
                if response.HasField(kind):
                    counter.documents += 1
                yield response

        return counted()
