"""Nanoseconds since the epoch (the model's times) to protobuf Timestamps."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)
