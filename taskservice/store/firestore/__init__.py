"""The production store: Cloud Firestore over grpc.aio. FirestoreStore (the
TaskStore calls, each in the fewest Firestore round trips) and the WatchTasks
watcher with its shared Listen stream both build on the same parts, passed
in rather than reached for: the codec (message classes, field encoding,
query building), the error mapping, and the RPC layer (channels, metadata,
the RPCs with their telemetry, reads at a past read time)."""

from taskservice.store.firestore._store import FirestoreStore

__all__ = ["FirestoreStore"]
