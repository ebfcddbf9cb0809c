"""A raw HTTP/2 gRPC client (the `h2` package) for exact frame orders that
gRPC's own clients do not let a test choose: END_STREAM and RST_STREAM back to
back, a reset a moment after the half-close, and so on."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence

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
) -> None:
    """Sends a client stream, half-closes it and resets it with CANCEL.

    separate_end=True sends the messages, then an empty DATA frame with
    END_STREAM and the RST_STREAM(CANCEL) in one socket write (what grpc-js's
    call.cancel() puts on the wire); False sets END_STREAM on the last DATA
    frame. reset_gap > 0 waits that long between the half-close and the reset.
    user_agent is grpc-js's by default: the server gives only callers on
    Node's http2 a grace for a reset behind END_STREAM.
    """
    sock = socket.create_connection((host, port), timeout=5)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"{host}:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("user-agent", user_agent),
            ],
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
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"{host}:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
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
