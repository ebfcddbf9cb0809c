"""Opening a channel to TaskService the way callers should.

    async with connect("tasks-abc123-uc.a.run.app") as client:
        task = await client.stub.GetTask(GetTaskRequest(name="tasks/x"))

- `*.run.app` (or any https:// URL): TLS, with a Google ID token per call whose
  audience is the service URL (google-auth: the metadata server on Google
  Cloud, or a service-account key / gcloud user credentials elsewhere).
- localhost / 127.0.0.1 / [::1]: plaintext h2c, for a local server.
- `ipv4:host:port,host:port,...`: several instances, calls spread over them
  with gRPC's round_robin (an instance that goes away is skipped until it is
  back).
- Retries on UNAVAILABLE, and on a CANCELLED it did not cause (a call that
  met a server's shutdown, never run), only where a repeat cannot do harm:
  GetTask and ListTasks always (by the channel's service config), CreateTask
  only with a request_id, UpdateTask only with task.etag, DeleteTask only
  with an etag; those three also after a proxy reset the stream mid-call.
- A default deadline for calls that set none (10 s; 60 s for
  BatchCreateTasks), and keepalive pings so a dead connection is noticed.
- `TaskClient.connected`: waits for the connection, or says in one line why
  there is none (no server there, TLS against a plaintext server).
- `TaskClient.watch`: WatchTasks as an async iterator that resumes by
  itself, from the last resume token it received, when a stream ends in a
  way a reconnect mends (server restart or drain, the stream's age limit,
  a lost connection, a reader too slow), so the caller sees every event once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, TypedDict, TypeVar, Unpack, cast
from urllib.parse import urlsplit

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tasks.v1 import task_service_pb2 as pb
from tasks.v1 import task_service_pb2_grpc

from taskservice.domain.retry import Backoff, retrying

SERVICE = "tasks.v1.TaskService"
DEFAULT_TIMEOUT = 10.0
STREAM_TIMEOUT = 60.0
MAX_ATTEMPTS = 5
INITIAL_BACKOFF = 0.2
MAX_BACKOFF = 2.0
RETRY_BACKOFF = Backoff(attempts=MAX_ATTEMPTS, first=INITIAL_BACKOFF, maximum=MAX_BACKOFF)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
# A watch that ends with one of these is reopened from its last resume token
# (after a pause: WATCH_BACKOFF, reset by every event received).
WATCH_RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # restart, drain, age limit, connection lost
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # too slow, or too many watchers just now
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a proxy's own timeout
        grpc.StatusCode.CANCELLED,  # cancelled on the server's side
        grpc.StatusCode.INTERNAL,  # a stream cut mid-frame (RST_STREAM)
        grpc.StatusCode.UNKNOWN,
    }
)
WATCH_BACKOFF = Backoff(first=0.1, maximum=5.0)  # no bound: the caller stops iterating
log = logging.getLogger(__name__)

SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": SERVICE, "method": "GetTask"},
                {"service": SERVICE, "method": "ListTasks"},
            ],
            "retryPolicy": {
                "maxAttempts": MAX_ATTEMPTS,
                "initialBackoff": f"{INITIAL_BACKOFF}s",
                "maxBackoff": f"{MAX_BACKOFF}s",
                "backoffMultiplier": 2,
                # CANCELLED: what grpc core answers for a call that reached a
                # server as it began shutting down, unrun (grpc/grpc#41785).
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ]
}
# A gRPC channel argument: its name and an integer or string value.
ChannelOption: TypeAlias = tuple[str, int | str]
CHANNEL_OPTIONS: list[ChannelOption] = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Reconnect soon after a restart (the default first wait is 1 s), so the
    # retries above land on the new server rather than on a backing-off channel.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


@dataclass(frozen=True)
class Target:
    address: str  # host:port for grpc
    secure: bool
    audience: str | None  # for ID tokens


def parse_target(target: str) -> Target:
    """Where to connect and how: TLS + ID token for Cloud Run, plaintext for
    localhost. A gRPC target naming several addresses
    (`ipv4:127.0.0.1:8081,127.0.0.1:8082`) is passed on as it is: plaintext
    when every address is on loopback."""
    raw = target.strip()
    if raw.startswith(("ipv4:", "ipv6:")):
        addresses = raw.split(":", 1)[1].split(",")
        hosts = {a.rsplit(":", 1)[0].strip("[]") for a in addresses}
        return Target(raw, secure=not hosts <= set(LOCAL_HOSTS), audience=None)
    if "://" in raw:
        parts = urlsplit(raw)
        host = parts.hostname or ""
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
    else:
        parts = urlsplit("//" + raw)
        host = parts.hostname or ""
        port = parts.port or 0
        secure = host not in LOCAL_HOSTS
        port = port or (443 if secure else 8080)
    if not host:
        raise ValueError(f"no host in target {target!r}")
    shown = f"[{host}]" if ":" in host else host
    audience = f"https://{host}" if secure and host.endswith(".run.app") else None
    return Target(f"{shown}:{port}", secure, audience)


def _idempotent(method: str, request: object) -> bool:
    # Each method's request message, as its name says.
    if method.endswith("/CreateTask"):
        return bool(cast(pb.CreateTaskRequest, request).request_id)
    if method.endswith("/UpdateTask"):
        return bool(cast(pb.UpdateTaskRequest, request).task.etag)
    if method.endswith("/DeleteTask"):
        return bool(cast(pb.DeleteTaskRequest, request).etag)
    return False  # Get/List retry by service config; others never


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a failed call says, decoded once from its google.rpc.Status
    (grpc-status-details-bin): the ErrorInfo's reason, domain and metadata,
    and the fields a BadRequest names. has_status is False when the call
    carried no Status (an error from gRPC itself or a proxy)."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)
    has_status: bool = False
    has_error_info: bool = False
    status_code: int | None = None  # the Status's own code, which should match `code`


def error_details(err: grpc.aio.AioRpcError) -> ErrorDetails:
    """The one decoder of an error's google.rpc.Status details."""
    status = rpc_status.from_call(err)
    code, message = err.code(), err.details() or ""
    if status is None:
        return ErrorDetails(code, message)
    info: error_details_pb2.ErrorInfo | None = None
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return ErrorDetails(
        code,
        message,
        reason=info.reason if info else "",
        domain=info.domain if info else "",
        metadata=dict(info.metadata) if info else {},
        fields=fields,
        has_status=True,
        has_error_info=info is not None,
        status_code=status.code,
    )


def is_stream_reset(err: grpc.aio.AioRpcError) -> bool:
    """A stream reset mid-call by the peer or a proxy (nginx sends
    RST_STREAM INTERNAL_ERROR when it loses its upstream): gRPC reports
    INTERNAL "Received RST_STREAM with error code 2"."""
    return err.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (err.details() or "")


def _worth_retrying(err: grpc.aio.AioRpcError) -> bool:
    """A failure that says nothing about the request, only the way to it:
    UNAVAILABLE; CANCELLED, which a call this client did not cancel gets when
    it reached a server as it began shutting down (grpc core ends it unrun:
    grpc/grpc#41785); a stream a proxy reset mid-call (INTERNAL "Received
    RST_STREAM", as nginx does when it loses its upstream). Only requests
    that are safe to repeat are retried, so an attempt that did run is
    answered by its request_id or refused by its etag."""
    code = err.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    return is_stream_reset(err)


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class _WorthRetrying(Exception):
    """An attempt failed in a way worth retrying (_worth_retrying); carries
    the call to return if it was the last one."""

    def __init__(self, call: grpc.aio.Call) -> None:
        self.call = call


class _DefaultsAndRetries(grpc.aio.UnaryUnaryClientInterceptor):
    """A default deadline, and retries (_worth_retrying) for requests that say
    they are safe to repeat (request_id / etag), within the call's deadline."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _Req], Awaitable[grpc.aio.UnaryUnaryCall[_Req, _Resp]]
        ],
        details: grpc.aio.ClientCallDetails,
        request: _Req,
    ) -> _Resp | grpc.aio.UnaryUnaryCall[_Req, _Resp]:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        timeout = DEFAULT_TIMEOUT if details.timeout is None else details.timeout
        if not _idempotent(method, request):
            return await continuation(_with_timeout(details, timeout), request)

        async def attempt(remaining: float) -> grpc.aio.UnaryUnaryCall[_Req, _Resp]:
            call = await continuation(_with_timeout(details, max(remaining, 0.001)), request)
            try:
                await call
            except grpc.aio.AioRpcError as err:
                if _worth_retrying(err):
                    raise _WorthRetrying(call) from None
            return call  # done, or failed in a way a retry cannot mend

        try:
            return await retrying(
                attempt,
                retryable=lambda e: isinstance(e, _WorthRetrying),
                backoff=RETRY_BACKOFF,
                timeout=timeout,
            )
        except _WorthRetrying as last:
            return cast("grpc.aio.UnaryUnaryCall[_Req, _Resp]", last.call)  # attempt's call


def _with_timeout(
    details: grpc.aio.ClientCallDetails, timeout: float
) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method, timeout, details.metadata, details.credentials, details.wait_for_ready
    )


class _StreamDefaults(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]],
            Awaitable[grpc.aio.StreamUnaryCall[_Req, _Resp]],
        ],
        details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> _Resp | grpc.aio.StreamUnaryCall[_Req, _Resp]:
        if details.timeout is None:
            details = _with_timeout(details, STREAM_TIMEOUT)
        return await continuation(details, request_iterator)


def _id_token_credentials(audience: str) -> grpc.CallCredentials:
    import google.auth.transport.grpc
    import google.auth.transport.requests
    import google.oauth2.id_token

    request = google.auth.transport.requests.Request()
    credentials = google.oauth2.id_token.fetch_id_token_credentials(  # type: ignore[no-untyped-call]
        audience, request=request
    )
    plugin = google.auth.transport.grpc.AuthMetadataPlugin(credentials, request)  # type: ignore[no-untyped-call]
    return grpc.metadata_call_credentials(plugin)


def bearer_token_credentials(token: str) -> grpc.CallCredentials:
    """A fixed bearer token, e.g. from `gcloud auth print-identity-token`."""
    return grpc.access_token_call_credentials(token)


def open_channel(
    target: str,
    *,
    call_credentials: grpc.CallCredentials | None = None,
    root_certificates: bytes | None = None,
    server_name: str | None = None,
    extra_options: Sequence[ChannelOption] = (),
) -> grpc.aio.Channel:
    """A channel to TaskService at `target` (see the module docstring).

    call_credentials replaces the ID token (tests, other token sources);
    root_certificates and server_name are for private TLS front ends.
    """
    parsed = parse_target(target)
    options = [*CHANNEL_OPTIONS, *extra_options]
    if "," in parsed.address:  # several instances: spread calls over all of them
        config = {**SERVICE_CONFIG, "loadBalancingConfig": [{"round_robin": {}}]}
        options = [o for o in options if o[0] != "grpc.service_config"]
        options.append(("grpc.service_config", json.dumps(config)))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    interceptors = [_DefaultsAndRetries(), _StreamDefaults()]
    if not parsed.secure:
        return grpc.aio.insecure_channel(parsed.address, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    if call_credentials is None and parsed.audience is not None:
        call_credentials = _id_token_credentials(parsed.audience)
    if call_credentials is not None:
        credentials = grpc.composite_channel_credentials(credentials, call_credentials)
    return grpc.aio.secure_channel(
        parsed.address, credentials, options=options, interceptors=interceptors
    )


class Unreachable(Exception):
    """No connection to the target; the message is one line saying what to do."""


async def _tcp_answers(address: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout
        )
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    return True


class TaskClient:
    """A channel and its TaskService stub; an async context manager."""

    def __init__(self, channel: grpc.aio.Channel, target: str = "") -> None:
        self.channel = channel
        self.target = target
        self.stub = task_service_pb2_grpc.TaskServiceStub(channel)

    async def connected(self, timeout: float) -> None:
        """Returns once the channel is connected; raises Unreachable, with one
        line that names the target and the likely fix, as soon as the first
        attempt fails (no server there, TLS against a plaintext server, or
        the reverse) or when timeout passes first. Calls would otherwise
        retry UNAVAILABLE for seconds and end in gRPC's own wording."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        state = self.channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            ):
                raise Unreachable(await self._why_unreachable())
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0)):
                    await self.channel.wait_for_state_change(state)
            except TimeoutError:
                raise Unreachable(
                    f"no answer from {self.target} within {timeout:g} s: check --target"
                    " (TASKCTL_TARGET), or that the server is up"
                ) from None
            state = self.channel.get_state(try_to_connect=True)

    async def _why_unreachable(self) -> str:
        target = self.target
        try:
            parsed = parse_target(target)
        except ValueError as err:
            return str(err)
        if "," in parsed.address or not await _tcp_answers(parsed.address, 1.0):
            return (
                f"cannot connect to {target}: no server is listening there; start one"
                " (`taskservice`), or check --target (TASKCTL_TARGET)"
            )
        if parsed.secure:
            return (
                f"cannot connect to {target}: the TLS handshake failed; a local server"
                " speaks plaintext: use --target host:port, without https://"
            )
        return (
            f"cannot connect to {target}: something listens there but does not speak"
            " plaintext gRPC; for a TLS server, use an https:// target"
        )

    async def close(self) -> None:
        await self.channel.close()

    async def watch(
        self,
        filter: str = "",
        *,
        include_initial: bool = False,
        resume_token: str = "",
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> AsyncIterator[pb.WatchTasksResponse]:
        """Every WatchTasks event for `filter`, across as many streams as it
        takes: a stream that ends with a code in WATCH_RECONNECT_CODES is
        reopened from the last resume token received, so nothing is missed or
        repeated. Other errors (INVALID_ARGUMENT; OUT_OF_RANGE when the token
        is too old: list again, then watch from now) are raised. Runs until
        the caller stops iterating.

            async for event in client.watch('assignee = "ana"'):
                ...  # event.type, event.task, event.resume_token
        """
        token = resume_token
        pauses = WATCH_BACKOFF.pauses()
        while True:
            request = pb.WatchTasksRequest(
                filter=filter, resume_token=token, include_initial=include_initial and not token
            )
            call = self.stub.WatchTasks(request, metadata=metadata)
            try:
                async for event in call:
                    pauses = WATCH_BACKOFF.pauses()  # the stream was healthy: start over
                    token = event.resume_token
                    yield event
            except grpc.aio.AioRpcError as err:
                if err.code() not in WATCH_RECONNECT_CODES:
                    raise
                log.info("watch stream ended (%s); resuming", err.code().name)
            finally:
                call.cancel()
            # The server never ends a watch with OK; a proxy might: resume.
            await asyncio.sleep(next(pauses))

    async def __aenter__(self) -> TaskClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ChannelArgs(TypedDict, total=False):
    """open_channel's keyword arguments."""

    call_credentials: grpc.CallCredentials | None
    root_certificates: bytes | None
    server_name: str | None
    extra_options: Sequence[ChannelOption]


def connect(target: str, **kwargs: Unpack[ChannelArgs]) -> TaskClient:
    return TaskClient(open_channel(target, **kwargs), target)
