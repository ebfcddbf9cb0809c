"""Builds, starts and stops the grpc.aio server.

TaskServer owns the lifecycle: it registers TaskService, gRPC health and
server reflection (v1 and v1alpha) behind the call pipeline
(taskservice.api.calls); reports NOT_SERVING until the store answers a first
probe and from the moment shutdown starts; and on stop ends every open health
Watch and reflection stream at once, refuses new calls, gives in-flight calls
a grace period (which ends once none is left), then closes the store. As one
of several workers (TASKSERVICE_WORKERS, taskservice.runtime.supervisor) it
binds the port with SO_REUSEPORT and is SERVING only while every worker is
ready. With TASKSERVICE_TELEMETRY set it starts OpenTelemetry
(taskservice.observe.telemetry) for the pipeline and the store, and gives it a
last export at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING, cast

import grpc
from grpc_health.v1 import health_pb2_grpc
from tasks.v1 import task_service_pb2, task_service_pb2_grpc

from taskservice.api import reflection
from taskservice.api.calls import CallGate, CallLimits, CallPipeline, PipelineRegistrar
from taskservice.api.health import NOT_SERVING, SERVING, HealthService
from taskservice.api.health import SERVICE_NAME as HEALTH_SERVICE
from taskservice.api.service import TaskServicer
from taskservice.api.watching import WatchSettings
from taskservice.config import Config, ConfigError
from taskservice.domain.limits import MAX_TRANSPORT_MESSAGE_BYTES
from taskservice.observe import jsonlog
from taskservice.runtime.ports import check_bindable
from taskservice.runtime.supervisor import ReadinessBoard
from taskservice.store import TaskStore, open_store

if TYPE_CHECKING:
    from taskservice.observe.telemetry import Telemetry

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.server")

SERVICE_NAME = task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name
PROBE_TIMEOUT = 2.0
PROBE_INTERVAL = 0.5
SIBLING_POLL = 0.2
# Before shutdown starts, calls that reached the server but were not yet
# picked up are let in: until no call starts for PICKUP_QUIET_SECONDS, at most
# PICKUP_MAX_SECONDS (see TaskServer._pick_up_arrived_calls).
PICKUP_QUIET_SECONDS = 0.01
PICKUP_MAX_SECONDS = 0.1
# Once shutdown has started, the grace ends when no call has been running
# for this long (see TaskServer._end_grace_when_no_call_is_left): time for a
# call gRPC has already handed over to reach the pipeline, and for the last
# status to be written out.
IDLE_QUIET_SECONDS = 0.25
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # 1 for the workers of TASKSERVICE_WORKERS
    # The pipeline refuses messages over limits.MAX_REQUEST_BYTES itself.
    ("grpc.max_receive_message_length", MAX_TRANSPORT_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Ping idle clients so the resources of a vanished one are released.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_concurrent_streams", 256),  # per connection
    # Calls that arrived but that the event loop has not picked up yet: past
    # 1000 of them (randomly, up to 3000) gRPC core ends new ones CANCELLED
    # before the pipeline sees them, so with no status details and no access
    # line (src/core/server/server.cc, RealRequestMatcher::MatchRequest's
    # pending_backlog_protector_; a burst of 2,000 calls loses ~8% so). With
    # these limits each is picked up, and the pipeline's own bounds answer it.
    ("grpc.server.max_pending_requests", 8000),
    ("grpc.server.max_pending_requests_hard_limit", 16000),
]


class TaskServer:
    """One TaskService process: a grpc.aio server over one store."""

    def __init__(self, config: Config, store: TaskStore | None = None) -> None:
        self.config = config
        self.store = store if store is not None else open_store(config)
        jsonlog.set_project(config.project)
        self.health = HealthService((SERVICE_NAME,))
        verifier = None
        if config.auth == "google-id-token":
            from taskservice.api.auth import IdTokenVerifier

            verifier = IdTokenVerifier(config.audience, config.allowed_callers, config.certs_url)
        self.gate = CallGate(
            CallLimits(
                max_calls=config.max_concurrent_rpcs,
                max_watchers=config.max_watchers,
                max_tool_streams=config.max_tool_streams,
                tool_stream_idle_seconds=config.tool_stream_idle_seconds,
            )
        )
        # No maximum_concurrent_rpcs: gRPC's own bound counts every call alike
        # (probes, streams, unauthenticated callers); the gate counts them apart.
        options = list(SERVER_OPTIONS)
        self.board: ReadinessBoard | None = None
        if config.worker is not None:  # one of several processes on this port
            options[0] = ("grpc.so_reuseport", 1)
            self.board = ReadinessBoard(config.worker.readiness_path, config.worker.count)
        self.telemetry = _telemetry_for(config) if config.telemetry != "off" else None
        if self.telemetry is not None:
            self.store.use_telemetry(self.telemetry)
        self.server = grpc.aio.server(options=options)
        pipeline = CallPipeline(self.gate, verifier, self.telemetry)
        # It stands in for the server in the generated add_*_to_server functions,
        # which call only the two methods it has.
        registrar = cast(grpc.aio.Server, PipelineRegistrar(self.server, pipeline))
        servicer = TaskServicer(
            self.store,
            stream_idle_seconds=config.stream_idle_seconds,
            stream_max_seconds=config.stream_max_seconds,
            watch=WatchSettings(
                progress_seconds=config.watch_progress_seconds,
                max_seconds=config.watch_max_seconds,
                buffer_events=config.watch_buffer,
                memory_bytes=config.watch_memory_bytes(),
            ),
        )
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(servicer, registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        if config.reflection:
            served = reflection.ReflectionService((SERVICE_NAME, HEALTH_SERVICE))
            for name in (reflection.V1, reflection.V1ALPHA):
                registrar.add_registered_method_handlers(name, reflection.method_handlers(served))
        # Last: what no service above has (UNIMPLEMENTED, logged and counted).
        self.server.add_generic_rpc_handlers((pipeline.unknown_methods(),))
        self.store_target = store_target(config) if store is None else "a store given in-process"
        self.port = 0
        self._probe: asyncio.Task[None] | None = None
        self._siblings: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port. OSError, with a
        message that says what to do, when the address cannot be bound."""
        if self.board is None:  # workers share a port their siblings hold
            check_bindable(self.config.host, self.config.port)
        try:
            self.port = self.server.add_insecure_port(self.config.address)
        except RuntimeError:  # taken between the check and now
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.address}")
        await self.server.start()
        self._probe = asyncio.create_task(self._become_ready())
        log.info(
            "listening on %s:%d with the %s store (%s)",
            self.config.host,
            self.port,
            self.store.kind,
            self.store_target,
            extra={
                "fields": {
                    "address": f"{self.config.host}:{self.port}",
                    "store": self.store.kind,
                    "store_target": self.store_target,
                }
            },
        )
        return self.port

    async def _become_ready(self) -> None:
        """Probes the store until it answers, then reports SERVING."""
        failures = 0
        while not self._stopping:
            try:
                await self.store.check(PROBE_TIMEOUT)
            except Exception as exc:  # any failure just means "not ready yet"
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    cause = exc.__cause__ or exc
                    log.warning(
                        "store not ready (%s: %s: %s); retrying",
                        self.store_target,
                        type(cause).__name__,
                        cause,
                    )
                await asyncio.sleep(PROBE_INTERVAL)
                continue
            if self.board is None:
                self.health.set_all(SERVING)
            else:
                assert self.config.worker is not None
                self.board.mark(self.config.worker.index, True)
                self._siblings = asyncio.create_task(self._follow_siblings(self.board))
            log.info("store ready; serving")
            return

    async def _follow_siblings(self, board: ReadinessBoard) -> None:
        """A worker is SERVING only while every worker is ready."""
        shown = None
        while not self._stopping:
            status = SERVING if board.all_ready() else NOT_SERVING
            if status != shown:
                self.health.set_all(status)
                shown = status
            await asyncio.sleep(SIBLING_POLL)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, end the long-lived streams, refuse new calls,
        let in-flight ones finish within `grace` seconds (no longer once none
        is left), then close the store."""
        if self._stopping:
            return
        self._stopping = True
        self.health.set_all(NOT_SERVING, final=True)
        if self.board is not None and self.config.worker is not None:
            self.board.mark(self.config.worker.index, False)
        for task in (self._probe, self._siblings):
            if task is not None:
                task.cancel()
        await asyncio.sleep(0)  # let open Watch streams send NOT_SERVING first
        self.gate.drain()
        await self._pick_up_arrived_calls()
        stopping = asyncio.ensure_future(
            self.server.stop(self.config.grace_seconds if grace is None else grace)
        )
        await self._end_grace_when_no_call_is_left(stopping)
        await stopping
        await self.store.close()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.shutdown)
        log.info("stopped")

    async def _pick_up_arrived_calls(self) -> None:
        """When shutdown starts, grpc core ends every call that has reached
        the server but that grpc.aio has not yet picked up with CANCELLED, and
        never runs it (grpc/grpc#41785): a caller cannot tell that from a call
        cut short. A busy event loop leaves such a backlog, so the loop is
        first given time to pick it up: until no new call has started for
        PICKUP_QUIET_SECONDS, at most PICKUP_MAX_SECONDS. What still arrives
        between shutdown and the client reading the GOAWAY meets the same
        fate; taskservice.client retries that CANCELLED when the request is
        safe to repeat."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PICKUP_MAX_SECONDS
        seen = -1
        while self.gate.started != seen and loop.time() < deadline:
            seen = self.gate.started
            await asyncio.sleep(PICKUP_QUIET_SECONDS)

    async def _end_grace_when_no_call_is_left(self, stopping: asyncio.Future[None]) -> None:
        """A graceful stop also waits for every connection to close, and a
        client that stops reading (it never acknowledges the GOAWAY) holds
        its connection for the whole grace. Once no call has been running for
        IDLE_QUIET_SECONDS, the stop is made immediate: there is no call left
        for it to end, and it closes the connections left. After the GOAWAY
        no call starts; a call still running keeps the grace."""
        idle_at = -1  # calls started when the gate was last seen idle
        while not stopping.done():
            if self.gate.running == 0 and self.gate.started == idle_at:
                await self.server.stop(0)
                return
            idle_at = self.gate.started if self.gate.running == 0 else -1
            await asyncio.wait((stopping,), timeout=IDLE_QUIET_SECONDS)


def store_target(config: Config) -> str:
    """What the configured store reads and writes, for the log: the SQLite
    file, or the Firestore project, database and address."""
    if config.store == "sqlite":
        return f"SQLite file {os.path.abspath(config.sqlite_path)}"
    if config.firestore_emulator_host:
        where = f"emulator {config.firestore_emulator_host}"
    else:
        from taskservice.store.channels import FIRESTORE_HOST

        where = FIRESTORE_HOST
    return f"Firestore project {config.project}, database {config.firestore_database}, {where}"


def _telemetry_for(config: Config) -> Telemetry:
    """OpenTelemetry as configured (imported only when it is on, and
    installed only with the extra: taskservice[otlp] or taskservice[gcp])."""
    try:
        from taskservice.observe.telemetry import TelemetrySettings, start_telemetry

        settings = TelemetrySettings(
            exporter=config.telemetry,
            otlp_endpoint=config.otlp_endpoint,
            sample_ratio=config.trace_sample_ratio,
            metrics_interval_seconds=config.metrics_interval_seconds,
            service=config.service_name,
            revision=config.revision,
            project=config.project,
        )
        return start_telemetry(settings)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("opentelemetry"):
            raise
        extra = "gcp" if config.telemetry == "gcp" else "otlp"
        raise ConfigError(
            f"TASKSERVICE_TELEMETRY={config.telemetry} needs OpenTelemetry, which is not"
            f" installed ({err.name}): pip install 'taskservice[{extra}]', or turn it off"
            " (TASKSERVICE_TELEMETRY=off)"
        ) from None
    except Exception as err:
        if type(err).__name__ == "DefaultCredentialsError":  # google.auth, imported lazily
            raise ConfigError(
                "TASKSERVICE_TELEMETRY=gcp needs Google credentials: run `gcloud auth"
                " application-default login` (in a container: mount a key and set"
                " GOOGLE_APPLICATION_CREDENTIALS), or export to a collector"
                " (TASKSERVICE_TELEMETRY=otlp), or turn it off (TASKSERVICE_TELEMETRY=off)"
            ) from None
        raise


async def wait_for_stop_signal() -> None:
    """Returns at the first SIGTERM or SIGINT. From then on both are ignored:
    the drain must finish, and asyncio would otherwise restore the default
    (fatal) disposition when the loop closes, while the process is still
    tearing down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
