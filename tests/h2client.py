"""A raw HTTP/2 gRPC client (the `h2` package) for exact frame orders that
gRPC's own clients do not let a test choose: END_STREAM and RST_STREAM back to
back, a reset a moment after the half-close, and so on."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.errors
import h2.events
from google.protobuf.message import Message


def grpc_frame(message: Message) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def cancelled_client_stream(
    host: str,
    port: int,
    path: str,
    messages: Sequence[Message],
    *,
    reset_gap: float = 0.0,
    separate_end: bool = True,
    user_agent: str = "grpc-node-js/1.14.0",
    metadata: Sequence[tuple[str, str]] = (),
) -> None:
    """Sends a client stream, half-closes it and resets it with CANCEL.

    separate_end=True sends the messages, then an empty DATA frame with
    END_STREAM and the RST_STREAM(CANCEL) in one socket write (what grpc-js's
    call.cancel() puts on the wire); False sets END_STREAM on the last DATA
    frame. reset_gap > 0 waits that long between the half-close and the reset.
    user_agent is grpc-js's by default: the server gives only callers on
    Node's http2 a grace for a reset behind END_STREAM. metadata: more headers
    (an `authorization`, say).
    """
    sock = socket.create_connection((host, port), timeout=5)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream, _headers(host, port, path, [("user-agent", user_agent), *metadata])
        )
        body = b"".join(grpc_frame(m) for m in messages)
        conn.send_data(stream, body, end_stream=not separate_end)
        sock.sendall(conn.data_to_send())
        if separate_end:
            time.sleep(0.01)  # the messages are read before the stream ends
            conn.send_data(stream, b"", end_stream=True)
        if reset_gap:
            sock.sendall(conn.data_to_send())
            time.sleep(reset_gap)
        conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        sock.sendall(conn.data_to_send())
        time.sleep(0.05)  # let the server see the reset before the socket closes
    finally:
        sock.close()


def unary_call(host: str, port: int, path: str, body: bytes) -> dict[str, str]:
    """Sends one gRPC request (body: the serialized message) and returns the
    headers and trailers the server answers with, merged."""
    sock = socket.create_connection((host, port), timeout=5)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, _headers(host, port, path, ()))
        conn.send_data(stream, b"\x00" + struct.pack(">I", len(body)) + body, end_stream=True)
        sock.sendall(conn.data_to_send())
        answer: dict[str, str] = {}
        while True:
            data = sock.recv(65536)
            if not data:
                return answer
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    answer.update((k.decode(), v.decode()) for k, v in event.headers)
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return answer
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()


def _events(conn: h2.connection.H2Connection, data: bytes) -> list[h2.events.Event]:
    """The events in `data`, frame by frame, GOAWAY frames left out: after
    one, h2 refuses every frame, but a server still ends the calls it has
    (their trailers follow the GOAWAY)."""
    events: list[h2.events.Event] = []
    buffer = getattr(conn, "_pending_bytes", b"") + data
    while len(buffer) >= 9:
        size = 9 + int.from_bytes(buffer[:3], "big")
        if len(buffer) < size:
            break
        frame, buffer = buffer[:size], buffer[size:]
        if frame[3] != 0x7:  # GOAWAY
            events += conn.receive_data(frame)
    conn._pending_bytes = buffer  # type: ignore[attr-defined]
    return events


def _receive(sock: socket.socket, deadline: float) -> bytes:
    """What the socket has by the monotonic deadline; b"" once it passed or
    the server closed the connection."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


def _headers(
    host: str, port: int, path: str, extra: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"{host}:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


def messageless_calls(
    host: str,
    port: int,
    path: str,
    count: int,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 5.0,
    end_stream: bool = True,
) -> list[str | None]:
    """Opens `count` calls on one connection, each HEADERS with END_STREAM and
    no DATA frame (end_stream=False: HEADERS alone, the call left open), and
    waits up to `timeout` for their statuses: each call's grpc-status (as
    sent), or None for a call that got none in time."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        streams = []
        for _ in range(count):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, _headers(host, port, path, metadata), end_stream=end_stream)
            streams.append(stream)
            sock.sendall(conn.data_to_send())
        statuses: dict[int, str | None] = dict.fromkeys(streams)
        pending = set(streams)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            data = _receive(sock, deadline)
            if not data:
                break
            for event in _events(conn, data):
                if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                    found = dict(
                        (
                            k.decode() if isinstance(k, bytes) else k,
                            v.decode() if isinstance(v, bytes) else v,
                        )
                        for k, v in event.headers
                    )
                    if "grpc-status" in found:
                        statuses[event.stream_id] = found["grpc-status"]
                        pending.discard(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    pending.discard(event.stream_id)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            sock.sendall(conn.data_to_send())
        return [statuses[s] for s in streams]
    finally:
        sock.close()


class StalledStream:
    """A server-streaming call from a client that stops granting HTTP/2
    flow-control window: it sends no WINDOW_UPDATE until `resume()`, so the
    server can send at most the initial 64 KiB windows. metadata: more
    headers (an `authorization`, say)."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        request: Message,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.stream, _headers(host, port, path, metadata))
        self.conn.send_data(self.stream, grpc_frame(request), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.body = b""
        self.unacknowledged = 0
        self.trailers: dict[str, str] | None = None
        self.reset = False

    def _pump(self, timeout: float, until: Callable[[], bool], grant: bool) -> None:
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            data = _receive(self.sock, deadline)
            if not data:
                return
            for event in _events(self.conn, data):
                if isinstance(event, h2.events.DataReceived):
                    self.body += event.data
                    self.unacknowledged += event.flow_controlled_length
                elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                    found = {_text(k): _text(v) for k, v in event.headers}
                    if "grpc-status" in found:
                        self.trailers = found
                elif isinstance(event, h2.events.StreamReset):
                    self.reset = True
            if grant and self.unacknowledged:
                self.conn.acknowledge_received_data(self.unacknowledged, self.stream)
                self.unacknowledged = 0
            self.sock.sendall(self.conn.data_to_send())

    def messages(self) -> list[bytes]:
        """The gRPC messages received so far (serialized)."""
        found, rest = [], self.body
        while len(rest) >= 5:
            size = struct.unpack(">I", rest[1:5])[0]
            if len(rest) < 5 + size:
                break
            found.append(rest[5 : 5 + size])
            rest = rest[5 + size :]
        return found

    def read_without_granting(self, seconds: float) -> None:
        """Reads the socket for `seconds`, granting no window."""
        self._pump(seconds, lambda: False, grant=False)

    def read_until_messages(self, count: int, timeout: float) -> None:
        """Reads, granting no window, until `count` messages have come."""
        self._pump(timeout, lambda: len(self.messages()) >= count, grant=False)

    def resume(self, timeout: float, messages: int | None = None) -> None:
        """Grants window for everything received, and reads until the
        status, a reset, `messages` messages, or `timeout`."""

        def done() -> bool:
            if self.trailers is not None or self.reset:
                return True
            return messages is not None and len(self.messages()) >= messages

        self._pump(timeout, done, grant=True)

    def close(self) -> None:
        self.sock.close()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class UnreadCall:
    """A call half-closed without a message (HEADERS with END_STREAM; with
    empty_data, HEADERS and then an empty DATA frame with END_STREAM) from a
    client that then stops reading: it reads nothing, or, with
    read_until_goaway(), every frame up to the server's first GOAWAY and
    nothing after. Its connection stays open until close()."""

    def __init__(self, host: str, port: int, path: str, *, empty_data: bool = False) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            self.stream, _headers(host, port, path, ()), end_stream=not empty_data
        )
        if empty_data:
            self.conn.send_data(self.stream, b"", end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.status: str | None = None  # the call's grpc-status, once read
        self.goaway = False
        self._unread = b""

    def read_until_goaway(self, timeout: float) -> None:
        """Reads and answers frames (SETTINGS, PING) until the first GOAWAY;
        the frames behind it stay unread, and the GOAWAY's PING unanswered."""
        deadline = time.monotonic() + timeout
        while not self.goaway and time.monotonic() < deadline:
            data = _receive(self.sock, deadline)
            if not data:
                return
            self._unread += data
            while len(self._unread) >= 9 and not self.goaway:
                size = 9 + int.from_bytes(self._unread[:3], "big")
                if len(self._unread) < size:
                    break
                frame, self._unread = self._unread[:size], self._unread[size:]
                if frame[3] == 0x7:
                    self.goaway = True
                else:
                    self._take(self.conn.receive_data(frame))
            if not self.goaway:
                self.sock.sendall(self.conn.data_to_send())

    def read_to_end(self, timeout: float) -> None:
        """Reads, answering nothing, until the server closes the connection."""
        deadline = time.monotonic() + timeout
        data, self._unread = self._unread, b""
        while True:
            self._take(_events(self.conn, data))
            data = _receive(self.sock, deadline)
            if not data:
                return

    def _take(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                found = {_text(k): _text(v) for k, v in event.headers}
                self.status = found.get("grpc-status", self.status)

    def close(self) -> None:
        self.sock.close()
