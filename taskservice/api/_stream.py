"""The messages of a call: request bytes decoded (INVALID_ARGUMENT for bytes
that are not the message, RESOURCE_EXHAUSTED over the size limit), a client
stream's messages counted as they come, and the stream pump that writes a
server stream's messages until the stream ends, is idle too long, is ended
by its own code (StreamControl) or by the server's drain."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from google.protobuf.message import Message

# What a send to a client that went away raises (grpc.aio has no public name).
from grpc._cython.cygrpc import ExecuteBatchError  # type: ignore[import-not-found]

from taskservice.api._access import CallRecord, deadline_passed, size_of
from taskservice.domain.errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from taskservice.domain.limits import MAX_REQUEST_BYTES

# When the server drains, how long a stream's message in flight may take to
# reach its client before the stream is cut.
DRAIN_WRITE_GRACE_SECONDS = 1.0
# A method's request decoder (None: the method takes the raw bytes), and what
# a handler is given: its request message, or those bytes.
Decode: TypeAlias = Callable[[bytes], Message] | None
Request: TypeAlias = Message | bytes


@dataclass
class StreamControl:
    """What a server-streaming method's code may tell the pipeline about its
    stream (taskservice.api.calls.current_stream, set while the method runs)."""

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
    status_metadata: Callable[[Message | None], dict[str, str]] = lambda last_sent: {}

    def end(self, error: ServiceError) -> None:
        if not self.ended.done():
            self.ended.set_result(error)


current_stream: contextvars.ContextVar[StreamControl | None] = contextvars.ContextVar(
    "current_stream", default=None
)


def decode_message(decode: Decode, raw: bytes, field: str) -> Request:
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


async def decoded(
    raw_requests: AsyncIterator[bytes], decode: Decode, call: CallRecord
) -> AsyncIterator[Request]:
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
            call.waiting_on_caller = deadline_passed(call.context)
            return
        call.waiting_on_caller = False
        call.request_bytes += len(raw)
        message = decode_message(decode, raw, f"requests[{call.messages_in}]")
        call.messages_in = (call.messages_in or 0) + 1
        yield message


async def pump(
    responses: AsyncIterable[Message],
    call: CallRecord,
    idle: float | None,
    control: StreamControl,
    drain: asyncio.Event,
    release: Callable[[], None],
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
    draining = asyncio.ensure_future(drain.wait())
    try:
        await asyncio.wait((writing, draining, control.ended), return_when=asyncio.FIRST_COMPLETED)
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
        release()  # ended: its slot is free, whatever the client reads
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


async def _write_all(
    responses: AsyncIterable[Message], call: CallRecord, idle: float | None, stop: asyncio.Event
) -> None:
    """Writes until the stream ends or `stop` is set (then after the write in
    flight, if any)."""
    iterator = aiter(responses)
    stopped = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[Message] | None = None
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
            call.response_bytes += size_of(message)
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
