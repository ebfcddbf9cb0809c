"""Every limit a caller can meet, in one place: what a request, a task, a
stream or an error status may hold, and how long the server waits.

Every other module imports its limits from here, and this module imports
nothing of the service's. Where a limit follows from another system's, the
comment says which. Tuning that a caller never meets (poll intervals,
backoffs, cache sizes) stays beside the code it tunes.
"""

from __future__ import annotations

# -- a task's fields (characters, i.e. code points) --------------------------
# A task id is at most 63 characters of [a-z0-9-] (one DNS label).
TASK_ID_MAX = 63
TITLE_MAX = 200
DESCRIPTION_MAX = 2000
ASSIGNEE_MAX = 256
TAG_MAX = 64
TAGS_MAX = 32

# -- requests -----------------------------------------------------------------
# The largest valid request is a CreateTaskRequest of ~20 KB (every field at
# its limit, 4-byte characters), far below Firestore's 1 MiB document; 64 KiB
# leaves room for unknown fields. The call pipeline refuses a bigger message
# (RESOURCE_EXHAUSTED, REQUEST_TOO_LARGE, logged and counted like any call).
MAX_REQUEST_BYTES = 64 * 1024
# What gRPC itself accepts in one message, so that the pipeline sees (and
# logs) requests between MAX_REQUEST_BYTES and this; beyond it gRPC refuses
# the message before any handler runs. It bounds the request bytes one call
# makes the server hold: 1 MiB per call in flight, so 40 MiB for Cloud Run's
# 40 concurrent requests per instance (deploy/service.yaml), and at most
# 256 MiB for one connection's 256 streams where nothing in front limits
# concurrency (gRPC refuses a bigger message as its length arrives: 4
# concurrent 20 MiB requests raised peak RSS by 4 MB). A message over it
# leaves no access line for a unary call, and CANCELLED for a stream (gRPC
# cancels the handler as it does for a caller's cancel).
MAX_TRANSPORT_MESSAGE_BYTES = 1024 * 1024
MAX_FILTER_LENGTH = 1024
MAX_PAGE_TOKEN_LENGTH = 512
# The longest WatchTasksRequest.resume_token decoded; a longer one is refused
# (INVALID_RESUME_TOKEN) unread.
MAX_RESUME_TOKEN_LENGTH = 512
# An update mask names at most the six mutable fields, the four output-only
# ones and "*"; a longer mask is refused before any path is looked at.
MAX_MASK_PATHS = 16
DEFAULT_PAGE_SIZE = 50
# 200 tasks of the largest size are ~3.7 MB: a full page fits the 4 MiB that
# every gRPC client accepts by default.
MAX_PAGE_SIZE = 200

# -- BatchCreateTasks ------------------------------------------------------------
# Tasks in one call (taskctl import sends at most this many per call too).
MAX_BATCH = 500
# The response must reach a client with default settings (4 MiB receive
# limit), and the commit must fit a Firestore request (10 MiB; 4 MiB on the
# emulator): the tasks a batch returns may total at most 3 MiB, which leaves
# room for gRPC framing and, on the commit side, for document names and
# request-id markers (at most ~0.4 KB per item).
MAX_BATCH_RESPONSE_BYTES = 3 * 1024 * 1024
# After a client stream ends, how long the server waits for a reset that may
# follow (grpc-js's cancel() sends END_STREAM, then RST_STREAM once the first
# write has gone out) before it commits. It covers the slowest reset on a
# loaded machine: with the interop suite and the server sharing 2 cores, the
# reset trails END_STREAM by 0.7 ms at the median and 30 ms at most on a quiet
# machine, and by up to 135 ms with two busy loops on the same cores, where
# 50 ms lets about 1 cancelled batch in 40 be written. Only callers whose
# cancel sends END_STREAM first (Node's http2: grpc-js) pay this latency (no
# CPU): the price of their cancelled batch not being written.
BATCH_CANCEL_GRACE_SECONDS = 0.2
# The largest Commit request sent to Firestore (which accepts 10 MiB) and to
# its emulator (which keeps gRPC's default 4 MiB receive limit), each less
# 64 KiB. TaskService's own limits keep every commit well under both; a batch
# whose commit is over it is refused (INVALID_ARGUMENT, BATCH_COMMIT_TOO_LARGE)
# before it is sent.
MAX_COMMIT_BYTES = 10 * 1024 * 1024 - 64 * 1024
EMULATOR_MAX_COMMIT_BYTES = 4 * 1024 * 1024 - 64 * 1024

# What one WatchTasks stream may hold for a reader behind, besides its count
# of events (TASKSERVICE_WATCH_BUFFER): a stream past it is ended
# (WATCHER_TOO_SLOW) with its resume token.
WATCH_BUFFER_BYTES = 4 * 1024 * 1024

# -- error statuses -----------------------------------------------------------
# Whatever the input, a status stays small enough for a default client (8 KiB
# of metadata) to receive it: a message of at most MAX_MESSAGE_BYTES (UTF-8,
# cut with "…"), at most VIOLATIONS_SHOWN field violations (the rest counted in
# ErrorInfo.metadata["violation_count"]; this also keeps the work for a request
# with thousands of bad fields small), each field path and description and
# each metadata value at most MAX_TEXT characters, and at most
# MAX_METADATA_ENTRIES metadata entries with keys of at most MAX_METADATA_KEY.
MAX_MESSAGE_BYTES = 1024
VIOLATIONS_SHOWN = 10
MAX_TEXT = 200
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY = 64

# -- authentication (TASKSERVICE_AUTH=google-id-token) --------------------------
# Calls that may wait for Google's certificates at once; more are refused at
# once (UNAVAILABLE, AUTH_UNAVAILABLE), so a flood of tokens during a hanging
# fetch holds no more memory than this many calls.
MAX_AUTH_WAITING = 100

# -- time ---------------------------------------------------------------------
# A call of a method that takes one request message is ended (DEADLINE_EXCEEDED,
# REQUEST_IDLE) when the message has not come this long after its headers:
# every client sends both at once, and a caller that sends only headers would
# otherwise hold the call as long as it keeps its connection.
REQUEST_MESSAGE_SECONDS = 10.0
# How long a call's handler waits for its error status to be sent (behind the
# stream's messages in flight, to a client that may grant no window); then it
# leaves the status to gRPC core.
STATUS_SEND_SECONDS = 5.0
# The same wait once the server drains: a client that reads nothing then
# would hold the shutdown, and one that reads gets its status in far less.
DRAIN_STATUS_SECONDS = 1.0
# Every store call gets the time left of the caller's deadline, and never more
# than this, whatever the deadline: one Firestore or SQLite operation that has
# not answered in 30 s is stuck, and waiting longer (Cloud Run allows calls up
# to its request timeout, 3600 s in deploy/service.yaml) only holds a call slot.
MAX_STORE_CALL_SECONDS = 30.0
# A request_id is remembered at least this long (Firestore's TTL policy then
# deletes its marker; SQLite expires it in the query).
REQUEST_ID_TTL_NS = 7 * 24 * 3600 * 10**9
