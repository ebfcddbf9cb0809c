"""Nanoseconds since the epoch (the model's times) to protobuf Timestamps."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


def set_from_ns(timestamp: timestamp_pb2.Timestamp, ns: int) -> None:
    """Sets timestamp in place: for a message's own Timestamp field, cheaper
    than building one and copying it in."""
    timestamp.seconds, timestamp.nanos = divmod(ns, 1_000_000_000)


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    set_from_ns(timestamp, ns)
    return timestamp
