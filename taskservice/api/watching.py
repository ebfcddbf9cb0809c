"""The server side of one WatchTasks stream: resume tokens, the bounded
buffer between the store and the wire, and the stream's lifetime.

A resume token wraps the store's position (WatchEvent.position) with the
fingerprint of the filter it was issued for and a checksum, like a page token
(taskservice.domain.tokens, which explains why a checksum with a key in the
source is enough: a decoded position is checked by the store, and the
furthest a forged one leads is a point in a history the caller could watch
anyway).

The store's events go through a buffer of at most `buffer_events` messages
and `buffer_bytes` bytes; the wire takes them as fast as the client reads.
Events the store replays from what it keeps (initial tasks, the backlog of a
resume) wait for room in the buffer: the client reads them at its own pace.
Live events do not wait: a client that falls more than the buffer behind
them is ended with RESOURCE_EXHAUSTED (WATCHER_TOO_SLOW), so that it costs
no more memory, and one that stays longer than `max_seconds` with
UNAVAILABLE (STREAM_MAX_AGE), before a platform's request timeout cuts it
without a status. All streams of the process together may buffer at most
`memory_bytes` (WatchMemory, TASKSERVICE_WATCH_MEMORY_MB): past it, the
streams furthest behind are ended first (WATCHER_TOO_SLOW). Each such status
carries, in the ErrorInfo metadata "resume_token", the token of the last
event sent on the stream (the status follows that event on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from taskservice.config import DEFAULT_WATCH_MEMORY_MB, Config
from taskservice.domain.changes import WatchEvent, WatchQuery
from taskservice.domain.errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from taskservice.domain.limits import MAX_RESUME_TOKEN_LENGTH, WATCH_BUFFER_BYTES
from taskservice.domain.model import TaskFilter
from taskservice.domain.tokens import TokenProblem, seal, unseal

if TYPE_CHECKING:
    from tasks.v1.task_service_pb2 import WatchTasksResponse

    from taskservice.api.calls import StreamControl

_VERSION = 1
_KEY = b"taskservice.v1.resume-token"


_DEFAULTS = Config()  # each setting's declared default


@dataclass(frozen=True, slots=True)
class WatchSettings:
    progress_seconds: float = _DEFAULTS.watch_progress_seconds
    max_seconds: float = _DEFAULTS.watch_max_seconds
    buffer_events: int = _DEFAULTS.watch_buffer
    buffer_bytes: int = WATCH_BUFFER_BYTES
    # What all streams of the process together may buffer (WatchMemory).
    memory_bytes: int = DEFAULT_WATCH_MEMORY_MB * 2**20


# What a buffered message is counted as in WatchMemory: twice its encoded
# size, plus a fixed part (so that many small events are not taken for free).
# Measured: a WatchTasksResponse of 18 KB encoded (a task with every field at
# its limit) takes 37 KB of the process's memory.
MESSAGE_MEMORY_FACTOR = 2
MESSAGE_OVERHEAD_BYTES = 512


def _memory_cost(size: int) -> int:
    return MESSAGE_MEMORY_FACTOR * size + MESSAGE_OVERHEAD_BYTES


class WatchMemory:
    """The bound on what every WatchTasks stream of the process together
    buffers. Past it, the streams furthest behind (the most bytes buffered)
    are ended first, as a stream that falls behind its own buffer is, until
    the total is back under the bound."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used = 0
        self.ended = 0  # streams ended for the bound, ever
        self._buffers: set[_Buffer] = set()

    def add(self, buffer: _Buffer) -> None:
        self._buffers.add(buffer)

    def remove(self, buffer: _Buffer) -> None:
        self._buffers.discard(buffer)
        self.used -= buffer.cost
        buffer.cost = 0

    def grow(self, cost: int) -> None:
        self.used += cost
        while self.used > self.limit_bytes and self._buffers:
            furthest = max(self._buffers, key=lambda b: b.cost)
            if furthest.cost == 0:
                return
            self.ended += 1
            self.remove(furthest)
            furthest.over_memory()


def filter_fingerprint(task_filter: TaskFilter) -> bytes:
    return hashlib.blake2b(repr(task_filter).encode(), digest_size=8).digest()


def encode_resume_token(position: bytes, fingerprint: bytes) -> str:
    return seal(bytes([_VERSION]) + fingerprint + position, _KEY)


def _invalid(problem: str) -> InvalidArgument:
    return InvalidArgument([("resume_token", problem)], reason="INVALID_RESUME_TOKEN")


def decode_resume_token(token: str, fingerprint: bytes) -> bytes:
    """The store position in `token`; INVALID_ARGUMENT unless it is intact
    and was issued for the same filter."""
    try:
        payload = unseal(
            token, _KEY, max_length=MAX_RESUME_TOKEN_LENGTH, min_payload=1 + len(fingerprint)
        )
    except TokenProblem as problem:
        raise _invalid(str(problem)) from None
    if payload[0] != _VERSION:
        raise _invalid("was issued by an incompatible version; list again, then watch from now")
    if payload[1 : 1 + len(fingerprint)] != fingerprint:
        raise _invalid("belongs to a different filter; send the filter it was issued for")
    return payload[1 + len(fingerprint) :]


class _Buffer:
    """Messages waiting for the wire, bounded in count and bytes, and counted
    in the process's WatchMemory."""

    def __init__(
        self,
        max_messages: int,
        max_bytes: int,
        memory: WatchMemory,
        over_memory: Callable[[], None],
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.memory = memory
        self.over_memory = over_memory  # ends the stream, clearing the buffer
        self.messages: deque[tuple[WatchTasksResponse, int]] = deque()
        self.bytes = 0  # encoded
        self.cost = 0  # counted in WatchMemory
        self.finished = False
        self.error: BaseException | None = None
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        memory.add(self)

    def _fits(self, size: int) -> bool:
        return not self.messages or (
            len(self.messages) < self.max_messages and self.bytes + size <= self.max_bytes
        )

    def _append(self, message: WatchTasksResponse, size: int) -> None:
        if self.finished:
            return
        self.messages.append((message, size))
        self.bytes += size
        self._ready.set()
        cost = _memory_cost(size)
        self.cost += cost
        self.memory.grow(cost)

    def put_nowait(self, message: WatchTasksResponse) -> bool:
        """False when the message does not fit: the reader is too slow."""
        size = message.ByteSize()
        if not self._fits(size):
            return False
        self._append(message, size)
        return True

    async def put(self, message: WatchTasksResponse) -> None:
        """Waits for room, then adds the message."""
        size = message.ByteSize()
        while not self._fits(size):
            self._room.clear()
            await self._room.wait()
        self._append(message, size)

    def clear(self) -> None:
        self.messages.clear()
        self.bytes = 0
        self.memory.remove(self)

    def close(self) -> None:
        self.clear()
        self.finished = True

    def finish(self, error: BaseException | None = None) -> None:
        self.finished = True
        self.error = error
        self._ready.set()
        self._room.set()

    async def get(self) -> WatchTasksResponse | None:
        """The next message; None at the end; raises the producer's error."""
        while not self.messages:
            if self.finished:
                if self.error is not None:
                    raise self.error
                return None
            self._ready.clear()
            await self._ready.wait()
        message, size = self.messages.popleft()
        self.bytes -= size
        if self.cost:  # else already given back (remove)
            cost = _memory_cost(size)
            self.cost -= cost
            self.memory.used -= cost
        self._room.set()
        return message


async def serve_watch(
    events: AsyncIterator[WatchEvent],
    query: WatchQuery,
    to_message: Callable[[WatchEvent, str], WatchTasksResponse],
    settings: WatchSettings,
    control: StreamControl,
    memory: WatchMemory,
) -> AsyncIterator[WatchTasksResponse]:
    """The messages of one WatchTasks stream (see the module docstring).
    `events` is the store's watch of `query`; to_message turns an event and
    its resume token into a WatchTasksResponse."""
    fingerprint = filter_fingerprint(query.filter)
    control.status_metadata = lambda last: (
        {} if last is None else {"resume_token": cast("WatchTasksResponse", last).resume_token}
    )

    def end(error: ServiceError) -> None:
        """Stops reading the store and drops what the client has not been
        sent (a resume recomputes it): the pipeline ends the stream with the
        token of the last message sent."""
        buffer.clear()
        buffer.finish(error)
        control.end(error)

    def over_memory() -> None:
        end(
            ResourceExhausted(
                "the server's watch streams together hold as much as it allows, and this one"
                " was among the furthest behind; resume with the resume_token of the last"
                " event received, and read faster",
                reason="WATCHER_TOO_SLOW",
            )
        )

    buffer = _Buffer(settings.buffer_events, settings.buffer_bytes, memory, over_memory)

    async def produce() -> None:
        try:
            async for event in events:
                if buffer.finished:  # ended meanwhile (the process's bound)
                    return
                message = to_message(event, encode_resume_token(event.position, fingerprint))
                if event.catching_up:
                    await buffer.put(message)
                elif not buffer.put_nowait(message):
                    end(
                        ResourceExhausted(
                            f"the caller fell more than {settings.buffer_events} events behind"
                            " (or more than the buffer's bytes); resume with the resume_token"
                            " of the last event received, and read faster",
                            reason="WATCHER_TOO_SLOW",
                        )
                    )
                    return
            buffer.finish()
        except ServiceError as error:
            buffer.finish(error)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def too_old() -> None:
        end(
            Unavailable(
                f"the stream is {settings.max_seconds:g} s old and was ended before the"
                " platform's request timeout; reconnect with the resume_token",
                reason="STREAM_MAX_AGE",
            )
        )

    producer = asyncio.create_task(produce())
    timer = asyncio.get_running_loop().call_later(settings.max_seconds, too_old)
    try:
        while True:
            message = await buffer.get()
            if message is None:
                return
            yield message
    finally:
        timer.cancel()
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await producer
        buffer.close()
