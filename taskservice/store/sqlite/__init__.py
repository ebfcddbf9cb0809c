"""The embedded store: one SQLite file in WAL mode, with Firestore's semantics.

Writes run on one dedicated thread (SQLite has one writer at a time) inside
BEGIN IMMEDIATE transactions; reads run on a small pool of their own
connections, so a long batch commit does not stall reads and nothing blocks
the event loop (the engine: _engine.py). Every write stamps the row with a
version time, in whole microseconds like Firestore's, that is strictly
greater than the previous one; it is both the task's update_time and its
etag. A schema-0 file (versions in nanoseconds) is moved forward to whole
microseconds once, when it is opened (schema version 1). Every write also
appends to a change log that WatchTasks reads (_feed.py). `unusable_reason`
(_files.py) tells, before a server starts, why a path cannot hold the
database.
"""

from taskservice.store.sqlite._files import unusable_reason
from taskservice.store.sqlite._store import SqliteStore

__all__ = ["SqliteStore", "unusable_reason"]
