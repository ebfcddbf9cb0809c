"""Settings: the one reader of the environment, validated once at start.

SETTINGS lists every setting: its environment variable, the command-line flag
that overrides it (a few have one), its default and what it means; `load`
reads them all into a frozen Config, and `python -m taskservice --help` prints
the same table. Bad configuration raises ConfigError, whose message is one
line that says what to do. A variable that is set but empty is an error (say
what you mean: unset it for the default), except the ones that platforms set
(GOOGLE_CLOUD_PROJECT, GCP_PROJECT, FIRESTORE_EMULATOR_HOST, K_SERVICE).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_COLLECTION = re.compile(r"[A-Za-z0-9_-]{1,100}")
_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]|demo-[a-z0-9-]{1,60}")
_HOST_PORT = re.compile(r"\[?[A-Za-z0-9.:-]+\]?:\d{1,5}")
DEFAULT_EMULATOR_PROJECT = "demo-taskservice"
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Without a container memory limit, what all watch streams of a process may
# buffer (TASKSERVICE_WATCH_MEMORY_MB); with one, this share of it.
DEFAULT_WATCH_MEMORY_MB = 256
WATCH_MEMORY_SHARE = 0.25
# Firestore reads at a past time go back one hour; a minute less leaves room
# for the time a resumed watch takes to start reading.
FIRESTORE_MAX_RETENTION_SECONDS = 3540


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    default: str  # as shown in --help
    meaning: str
    flag: str | None = None
    platform: bool = False  # set by a platform: empty means unset


SETTINGS: tuple[Setting, ...] = (
    Setting("PORT", "8080", "listen port, on every interface", flag="--port"),
    Setting(
        "TASKSERVICE_STORE",
        "sqlite; firestore when K_SERVICE, GOOGLE_CLOUD_PROJECT, GCP_PROJECT or"
        " FIRESTORE_EMULATOR_HOST is set",
        "the store: sqlite or firestore",
        flag="--store",
    ),
    Setting(
        "TASKSERVICE_SQLITE_PATH",
        "./tasks.db",
        "the SQLite file (WAL mode; its directory is created)",
        flag="--sqlite-path",
    ),
    Setting(
        "GOOGLE_CLOUD_PROJECT",
        "from credentials; demo-taskservice on the emulator",
        "the Firestore project (GCP_PROJECT also works)",
        platform=True,
    ),
    Setting("FIRESTORE_DATABASE", "(default)", "the Firestore database id"),
    Setting(
        "FIRESTORE_EMULATOR_HOST",
        "unset",
        "host:port of a Firestore emulator to use instead of Firestore",
        platform=True,
    ),
    Setting(
        "TASKSERVICE_COLLECTION",
        "tasks",
        "the Firestore collection (request-id markers go to <collection>-requests)",
    ),
    Setting("TASKSERVICE_HOST", "[::]", "listen address"),
    Setting("TASKSERVICE_GRACE_SECONDS", "8", "how long in-flight calls may finish after SIGTERM"),
    Setting("LOG_LEVEL", "INFO", f"one of {', '.join(LOG_LEVELS)}; JSON lines on stderr"),
    Setting("TASKSERVICE_AUTH", "none", "none, or google-id-token: verify callers' ID tokens"),
    Setting("TASKSERVICE_AUDIENCE", "unset", "the audience ID tokens must carry (with auth)"),
    Setting("TASKSERVICE_ALLOWED_CALLERS", "unset", "comma-separated caller emails (with auth)"),
    Setting(
        "TASKSERVICE_CERTS_URL", GOOGLE_CERTS_URL, "where token-signing certificates come from"
    ),
    Setting("TASKSERVICE_REFLECTION", "on", "off removes server reflection"),
    Setting(
        "TASKSERVICE_STREAM_IDLE_SECONDS",
        "10",
        "a BatchCreateTasks stream silent this long is ended, nothing written",
    ),
    Setting(
        "TASKSERVICE_STREAM_MAX_SECONDS",
        "60",
        "a BatchCreateTasks stream longer than this is ended, nothing written",
    ),
    Setting(
        "TASKSERVICE_MAX_CONCURRENT_RPCS",
        "1000",
        "TaskService calls in flight; beyond, RESOURCE_EXHAUSTED",
    ),
    Setting(
        "TASKSERVICE_MAX_TOOL_STREAMS",
        "100",
        "open health Watch and reflection streams; beyond, RESOURCE_EXHAUSTED",
    ),
    Setting(
        "TASKSERVICE_TOOL_STREAM_IDLE_SECONDS",
        "300",
        "such a stream without a message this long is ended",
    ),
    Setting(
        "TASKSERVICE_MAX_WATCHERS",
        "1000",
        "open WatchTasks streams, counted apart from calls; beyond, RESOURCE_EXHAUSTED",
    ),
    Setting(
        "TASKSERVICE_WATCH_PROGRESS_SECONDS",
        "30",
        "a WatchTasks stream without an event this long gets a PROGRESS event",
    ),
    Setting(
        "TASKSERVICE_WATCH_MAX_SECONDS",
        "3300",
        "a WatchTasks stream is ended (UNAVAILABLE, with a resume token) at this age:"
        " keep it below the platform's request timeout",
    ),
    Setting(
        "TASKSERVICE_WATCH_BUFFER",
        "1000",
        "events a WatchTasks stream may fall behind its reader before it is ended",
    ),
    Setting(
        "TASKSERVICE_WATCH_MEMORY_MB",
        "a quarter of the container's memory limit (cgroup), shared by the workers;"
        f" {DEFAULT_WATCH_MEMORY_MB} without a limit",
        "what all WatchTasks streams of a process together may buffer for their readers;"
        " beyond, the streams furthest behind are ended (WATCHER_TOO_SLOW, with a resume token)",
    ),
    Setting(
        "TASKSERVICE_WATCH_RETENTION_SECONDS",
        "3600",
        "how long resume tokens stay valid: SQLite keeps its change log this long;"
        " Firestore allows at most 3540 (its reads in the past go back an hour)",
    ),
    Setting(
        "TASKSERVICE_WORKERS",
        "1",
        "server processes sharing the port (SO_REUSEPORT), supervised by the first; auto:"
        " the CPUs this container may use (its cgroup quota)",
    ),
    Setting(
        "TASKSERVICE_TELEMETRY",
        "off",
        "off, otlp (OpenTelemetry metrics and traces to OTEL_EXPORTER_OTLP_ENDPOINT) or gcp"
        " (Cloud Monitoring and Cloud Trace)",
    ),
    Setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://localhost:4317",
        "the OpenTelemetry collector (OTLP over gRPC) for TASKSERVICE_TELEMETRY=otlp;"
        " http:// is plaintext",
    ),
    Setting(
        "TASKSERVICE_TRACE_SAMPLE_RATIO",
        "0.01",
        "the share of calls traced when the caller sent no trace header (0..1); a caller's"
        " own sampling decision is always followed (a traced call costs ~250 µs of CPU)",
    ),
    Setting(
        "TASKSERVICE_METRICS_INTERVAL_SECONDS",
        "60",
        "how often metrics are exported (at least 10 with gcp)",
    ),
    Setting("K_SERVICE", "unset", "set by Cloud Run; selects the Firestore store", platform=True),
    Setting(
        "K_REVISION",
        "unset",
        "set by Cloud Run; names this instance's revision in telemetry",
        platform=True,
    ),
    Setting(
        "TASKSERVICE_WORKER",
        "unset",
        "set by the supervisor for each worker (slot/count/readiness file); do not set",
        platform=True,
    ),
)
FLAGS = {s.flag: s.env for s in SETTINGS if s.flag}


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which of the supervisor's workers this process is, and the file in
    which every worker marks itself ready (one byte each)."""

    index: int
    count: int
    readiness_path: str


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "[::]"
    port: int = 8080
    store: str = "sqlite"  # "sqlite" or "firestore"
    sqlite_path: str = "./tasks.db"
    project: str = ""  # Firestore project; "" = discover from credentials
    firestore_database: str = "(default)"
    firestore_emulator_host: str = ""  # "" = the real Firestore
    collection: str = "tasks"
    grace_seconds: float = 8.0  # in-flight calls get this long after SIGTERM
    log_level: str = "INFO"
    auth: str = "none"  # "none" or "google-id-token"
    audience: str = ""
    allowed_callers: tuple[str, ...] = ()
    certs_url: str = GOOGLE_CERTS_URL
    reflection: bool = True
    stream_idle_seconds: float = 10.0  # a batch stream silent this long is ended
    stream_max_seconds: float = 60.0  # a batch stream longer than this is ended
    max_concurrent_rpcs: int = 1000  # TaskService calls; beyond: RESOURCE_EXHAUSTED at once
    max_tool_streams: int = 100  # open health Watch and reflection streams
    tool_stream_idle_seconds: float = 300.0  # such a stream idle this long is ended
    max_watchers: int = 1000  # open WatchTasks streams
    watch_progress_seconds: float = 30.0
    watch_max_seconds: float = 3300.0
    watch_buffer: int = 1000
    watch_memory_mb: int = 0  # all watch streams of the process; 0: watch_memory_bytes()
    watch_retention_seconds: float = 3600.0
    workers: int = 1  # server processes sharing the port
    telemetry: str = "off"  # "off", "otlp" or "gcp"
    otlp_endpoint: str = "http://localhost:4317"
    trace_sample_ratio: float = 0.01
    metrics_interval_seconds: float = 60.0
    service_name: str = "taskservice"  # K_SERVICE on Cloud Run
    revision: str = ""  # K_REVISION on Cloud Run
    worker: WorkerSlot | None = None  # set when this process is one of several workers

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def watch_memory_bytes(self) -> int:
        """What all watch streams of this process may buffer: the setting,
        else a share of the container's memory limit (default_watch_memory_mb)."""
        mb = self.watch_memory_mb or default_watch_memory_mb(
            self.worker.count if self.worker else self.workers
        )
        return mb * 2**20


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is outside {lo}..{hi}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value:g} is outside {lo:g}..{hi:g}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        shown = " or ".join(repr(c) for c in choices)
        raise ConfigError(f"{name}={value!r} must be {shown}")
    return value


def load(env: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Config:
    """Reads TaskService's settings from `env` (os.environ), with `overrides`
    (keyed by variable name: the command-line flags) taking precedence."""
    env = {**env, **(overrides or {})}
    for setting in SETTINGS:
        raw = env.get(setting.env)
        if raw is not None and not raw.strip() and not setting.platform:
            raise ConfigError(
                f"{setting.env} is set but empty; unset it for the default ({setting.default})"
            )
    port = _int(env, "PORT", 8080, 0, 65535)
    on_google_cloud = any(
        env.get(k, "").strip() for k in ("K_SERVICE", "GOOGLE_CLOUD_PROJECT", "GCP_PROJECT")
    )
    emulator = env.get("FIRESTORE_EMULATOR_HOST", "").strip()
    if emulator and not _HOST_PORT.fullmatch(emulator):
        raise ConfigError(f"FIRESTORE_EMULATOR_HOST={emulator!r} must be host:port")
    store = _choice(
        env,
        "TASKSERVICE_STORE",
        "firestore" if on_google_cloud or emulator else "sqlite",
        ("sqlite", "firestore"),
    )
    project = (env.get("GOOGLE_CLOUD_PROJECT") or env.get("GCP_PROJECT") or "").strip()
    if store == "firestore" and not project and emulator:
        project = DEFAULT_EMULATOR_PROJECT
    if project and not _PROJECT.fullmatch(project):
        raise ConfigError(f"GOOGLE_CLOUD_PROJECT={project!r} is not a valid project id")
    collection = env.get("TASKSERVICE_COLLECTION", "").strip() or "tasks"
    if not _COLLECTION.fullmatch(collection):
        raise ConfigError(
            f"TASKSERVICE_COLLECTION={collection!r} must be 1-100 letters, digits, '_' or '-'"
        )
    database = env.get("FIRESTORE_DATABASE", "").strip() or "(default)"
    if database != "(default)" and not re.fullmatch(r"[a-z][a-z0-9-]{2,62}", database):
        raise ConfigError(f"FIRESTORE_DATABASE={database!r} is not a valid database id")
    sqlite_path = env.get("TASKSERVICE_SQLITE_PATH", "").strip() or "./tasks.db"
    grace = _int(env, "TASKSERVICE_GRACE_SECONDS", 8, 0, 60)
    host = env.get("TASKSERVICE_HOST", "").strip() or "[::]"
    log_level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    auth = _choice(env, "TASKSERVICE_AUTH", "none", ("none", "google-id-token"))
    audience = env.get("TASKSERVICE_AUDIENCE", "").strip()
    allowed = tuple(
        e.strip().lower()
        for e in env.get("TASKSERVICE_ALLOWED_CALLERS", "").split(",")
        if e.strip()
    )
    if auth == "google-id-token":
        if not audience:
            raise ConfigError("TASKSERVICE_AUTH=google-id-token needs TASKSERVICE_AUDIENCE")
        if not allowed:
            raise ConfigError(
                "TASKSERVICE_AUTH=google-id-token needs TASKSERVICE_ALLOWED_CALLERS (emails)"
            )
        bad = [e for e in allowed if not re.fullmatch(r"[^@\s,]+@[^@\s,]+", e)]
        if bad:
            raise ConfigError(f"TASKSERVICE_ALLOWED_CALLERS has entries that are not emails: {bad}")
    certs_url = env.get("TASKSERVICE_CERTS_URL", "").strip() or GOOGLE_CERTS_URL
    if not certs_url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        raise ConfigError("TASKSERVICE_CERTS_URL must be https (or http on loopback)")
    reflection = _choice(env, "TASKSERVICE_REFLECTION", "on", ("on", "off"))
    idle = _int(env, "TASKSERVICE_STREAM_IDLE_SECONDS", 10, 1, 3600)
    stream_max = _int(env, "TASKSERVICE_STREAM_MAX_SECONDS", 60, 1, 3600)
    max_rpcs = _int(env, "TASKSERVICE_MAX_CONCURRENT_RPCS", 1000, 1, 100_000)
    max_tool_streams = _int(env, "TASKSERVICE_MAX_TOOL_STREAMS", 100, 1, 100_000)
    tool_idle = _int(env, "TASKSERVICE_TOOL_STREAM_IDLE_SECONDS", 300, 1, 86_400)
    max_watchers = _int(env, "TASKSERVICE_MAX_WATCHERS", 1000, 1, 100_000)
    progress = _int(env, "TASKSERVICE_WATCH_PROGRESS_SECONDS", 30, 1, 3600)
    watch_max = _int(env, "TASKSERVICE_WATCH_MAX_SECONDS", 3300, 5, 86_400)
    if progress >= watch_max:
        raise ConfigError(
            f"TASKSERVICE_WATCH_PROGRESS_SECONDS={progress} must be less than"
            f" TASKSERVICE_WATCH_MAX_SECONDS={watch_max}: a stream must see a progress event"
        )
    watch_buffer = _int(env, "TASKSERVICE_WATCH_BUFFER", 1000, 1, 1_000_000)
    retention = _int(env, "TASKSERVICE_WATCH_RETENTION_SECONDS", 3600, 1, 30 * 86_400)
    if store == "firestore" and retention > FIRESTORE_MAX_RETENTION_SECONDS:
        if "TASKSERVICE_WATCH_RETENTION_SECONDS" in env:
            raise ConfigError(
                f"TASKSERVICE_WATCH_RETENTION_SECONDS={retention} is more than Firestore allows"
                f" ({FIRESTORE_MAX_RETENTION_SECONDS}: its reads in the past go back an hour)"
            )
        retention = FIRESTORE_MAX_RETENTION_SECONDS
    telemetry = _choice(env, "TASKSERVICE_TELEMETRY", "off", ("off", "otlp", "gcp"))
    otlp_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4317"
    if not re.fullmatch(r"https?://[^/\s]+(:\d+)?/?", otlp_endpoint):
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_ENDPOINT={otlp_endpoint!r} must be http://host:port"
            " (plaintext) or https://host:port"
        )
    sample_ratio = _float(env, "TASKSERVICE_TRACE_SAMPLE_RATIO", 0.01, 0.0, 1.0)
    metrics_interval = _float(env, "TASKSERVICE_METRICS_INTERVAL_SECONDS", 60.0, 0.1, 3600.0)
    if telemetry == "gcp" and metrics_interval < 10:
        raise ConfigError(
            f"TASKSERVICE_METRICS_INTERVAL_SECONDS={metrics_interval:g} is too short for Cloud"
            " Monitoring (at least 10)"
        )
    raw_workers = env.get("TASKSERVICE_WORKERS", "").strip().lower()
    if raw_workers == "auto":
        workers = available_cpus()
    else:
        workers = _int(env, "TASKSERVICE_WORKERS", 1, 1, 64)
    worker = _worker_slot(env.get("TASKSERVICE_WORKER", "").strip())
    watch_memory = _int(env, "TASKSERVICE_WATCH_MEMORY_MB", 0, 1, 1_000_000)
    return Config(
        host=host,
        port=port,
        store=store,
        sqlite_path=sqlite_path,
        project=project,
        firestore_database=database,
        firestore_emulator_host=emulator,
        collection=collection,
        grace_seconds=float(grace),
        log_level=log_level,
        auth=auth,
        audience=audience,
        allowed_callers=allowed,
        certs_url=certs_url,
        reflection=reflection == "on",
        stream_idle_seconds=float(idle),
        stream_max_seconds=float(stream_max),
        max_concurrent_rpcs=max_rpcs,
        max_tool_streams=max_tool_streams,
        tool_stream_idle_seconds=float(tool_idle),
        max_watchers=max_watchers,
        watch_progress_seconds=float(progress),
        watch_max_seconds=float(watch_max),
        watch_buffer=watch_buffer,
        watch_memory_mb=watch_memory,
        watch_retention_seconds=float(retention),
        telemetry=telemetry,
        otlp_endpoint=otlp_endpoint,
        trace_sample_ratio=sample_ratio,
        metrics_interval_seconds=metrics_interval,
        service_name=env.get("K_SERVICE", "").strip() or "taskservice",
        revision=env.get("K_REVISION", "").strip(),
        workers=workers,
        worker=worker,
    )


def _worker_slot(raw: str) -> WorkerSlot | None:
    if not raw:
        return None
    index, _, rest = raw.partition("/")
    count, _, path = rest.partition(":")
    try:
        slot = WorkerSlot(int(index), int(count), path)
    except ValueError:
        raise ConfigError(f"TASKSERVICE_WORKER={raw!r} is set by taskservice itself") from None
    if not 0 <= slot.index < slot.count or not path:
        raise ConfigError(f"TASKSERVICE_WORKER={raw!r} is set by taskservice itself")
    return slot


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its cgroup's CPU quota (v2 cpu.max, or
    v1 cfs_quota_us / cfs_period_us), rounded up, within the CPUs it may run
    on. A container's quota, not the host's count, is what Cloud Run gives."""
    allowed = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup)
    return max(1, min(allowed, math.ceil(quota))) if quota else allowed


def _cgroup_quota(cgroup: Path) -> float | None:
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def memory_limit_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's memory limit: its cgroup's (v2 memory.max, or v1
    memory.limit_in_bytes); None when there is none."""
    for path in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        try:
            value = int(raw)
        except ValueError:
            continue
        # cgroup v1 says "no limit" with a number near 2**63.
        return value if value < 2**62 else None
    return None


def default_watch_memory_mb(processes: int, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """TASKSERVICE_WATCH_MEMORY_MB when unset: WATCH_MEMORY_SHARE of the
    container's memory limit, split among its server processes, or
    DEFAULT_WATCH_MEMORY_MB without a limit."""
    limit = memory_limit_bytes(cgroup)
    if limit is None:
        return DEFAULT_WATCH_MEMORY_MB
    return max(1, int(limit * WATCH_MEMORY_SHARE / max(1, processes)) // 2**20)


def settings_help() -> str:
    """The settings table for --help: variable, default, meaning."""
    width = max(len(s.env) for s in SETTINGS)
    lines = []
    for s in SETTINGS:
        flag = f" (or {s.flag})" if s.flag else ""
        lines.append(f"  {s.env.ljust(width)}  {s.meaning}{flag}")
        lines.append(f"  {' ' * width}  default: {s.default}")
    return "\n".join(lines)
