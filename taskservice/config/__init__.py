"""Settings: the one reader of the environment, validated once at start.

Each setting is declared once, as a field of Config: its environment
variable, the parser that checks it (with its bounds), its default and what
it means (`setting`). `load` reads them all into a frozen Config; SETTINGS,
the `--help` table (settings_help) and docs/configuration.md
(`python -m taskservice.config`) are made from the same declarations. Bad
configuration raises ConfigError, whose message is one line that says what to
do. A variable that is set but empty is an error (say what you mean: unset
it for the default), except the ones that platforms set (GOOGLE_CLOUD_PROJECT,
GCP_PROJECT, FIRESTORE_EMULATOR_HOST, K_SERVICE, K_REVISION).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from taskservice.config import _render
from taskservice.config._cgroup import (
    DEFAULT_WATCH_MEMORY_MB,
    available_cpus,
    default_watch_memory_mb,
    memory_limit_bytes,
)
from taskservice.config._declare import Setting, setting
from taskservice.config._parsers import (
    ACCESS_LOGS,
    LOG_LEVELS,
    ConfigError,
    WorkerSlot,
    certs_url,
    choice,
    emails,
    integer,
    log_level,
    matching,
    number,
    seconds,
    switch,
    text,
    worker_count,
    worker_slot,
)

__all__ = [
    "ACCESS_LOGS",
    "DEFAULT_EMULATOR_PROJECT",
    "DEFAULT_WATCH_MEMORY_MB",
    "FLAGS",
    "GCP_TELEMETRY_ENDPOINT",
    "GOOGLE_CERTS_URL",
    "LOG_LEVELS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "WorkerSlot",
    "available_cpus",
    "default_watch_memory_mb",
    "load",
    "memory_limit_bytes",
    "settings_help",
    "settings_markdown",
]

DEFAULT_EMULATOR_PROJECT = "demo-taskservice"
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
# Google's OTLP endpoint (the Telemetry API): TASKSERVICE_TELEMETRY=gcp exports here.
GCP_TELEMETRY_ENDPOINT = "https://telemetry.googleapis.com"
# Firestore reads at a past time go back one hour; a minute less leaves room
# for the time a resumed watch takes to start reading.
FIRESTORE_MAX_RETENTION_SECONDS = 3540


@dataclass(frozen=True, slots=True)
class Config:
    port: int = setting(
        "PORT", 8080, integer(0, 65535), "listen port, on all interfaces", flag="--port"
    )
    store: str = setting(
        "TASKSERVICE_STORE",
        "sqlite",
        choice("sqlite", "firestore"),
        "the store",
        shown="sqlite; firestore when K_SERVICE, GOOGLE_CLOUD_PROJECT, GCP_PROJECT or"
        " FIRESTORE_EMULATOR_HOST is set",
        flag="--store",
    )
    sqlite_path: str = setting(
        "TASKSERVICE_SQLITE_PATH",
        "./tasks.db",
        text,
        "the SQLite file (WAL mode; its directory is created; /var/lib/taskservice/tasks.db"
        " in the image)",
        flag="--sqlite-path",
    )
    project: str = setting(
        "GOOGLE_CLOUD_PROJECT",
        "",
        matching(r"[a-z][a-z0-9-]{4,28}[a-z0-9]|demo-[a-z0-9-]{1,60}", "is not a valid project id"),
        "the Firestore project (GCP_PROJECT also works)",
        shown=f"from credentials; {DEFAULT_EMULATOR_PROJECT} on the emulator",
        platform=True,
    )
    firestore_database: str = setting(
        "FIRESTORE_DATABASE",
        "(default)",
        matching(r"\(default\)|[a-z][a-z0-9-]{2,62}", "is not a valid database id"),
        "the Firestore database id",
    )
    firestore_emulator_host: str = setting(
        "FIRESTORE_EMULATOR_HOST",
        "",
        matching(r"\[?[A-Za-z0-9.:-]+\]?:\d{1,5}", "must be host:port"),
        "host:port of a Firestore emulator to use instead of Firestore",
        platform=True,
    )
    collection: str = setting(
        "TASKSERVICE_COLLECTION",
        "tasks",
        matching(r"[A-Za-z0-9_-]{1,100}", "must be 1-100 letters, digits, '_' or '-'"),
        "the Firestore collection (request-id markers go to <collection>-requests)",
    )
    host: str = setting("TASKSERVICE_HOST", "[::]", text, "listen address")
    grace_seconds: float = setting(
        "TASKSERVICE_GRACE_SECONDS",
        8.0,
        seconds(0, 60),
        "how long in-flight calls may finish after SIGTERM",
    )
    log_level: str = setting(
        "LOG_LEVEL",
        "INFO",
        log_level,
        "the diagnostics' level; logs are JSON lines on stderr. Access lines have their own"
        " switch (TASKSERVICE_ACCESS_LOG)",
    )
    access_log: str = setting(
        "TASKSERVICE_ACCESS_LOG",
        "on",
        choice(*ACCESS_LOGS),
        "one access line per call, whatever LOG_LEVEL (the log-based metrics, alerts and"
        " dashboard read them; written in batches, at most 50 ms late): on (every call but"
        " health checks and reflection), all (those too), off",
    )
    auth: str = setting(
        "TASKSERVICE_AUTH",
        "none",
        choice("none", "google-id-token"),
        "google-id-token: verify callers' Google ID tokens (see SECURITY.md)",
    )
    audience: str = setting(
        "TASKSERVICE_AUDIENCE",
        "",
        text,
        "the audience tokens must carry (the service URL); required with auth",
    )
    allowed_callers: tuple[str, ...] = setting(
        "TASKSERVICE_ALLOWED_CALLERS", (), emails, "the caller emails admitted; required with auth"
    )
    certs_url: str = setting(
        "TASKSERVICE_CERTS_URL",
        GOOGLE_CERTS_URL,
        certs_url,
        "where token-signing certificates come from",
    )
    reflection: bool = setting(
        "TASKSERVICE_REFLECTION", True, switch, "off removes server reflection", shown="on"
    )
    stream_idle_seconds: float = setting(
        "TASKSERVICE_STREAM_IDLE_SECONDS",
        10.0,
        seconds(1, 3600),
        "a BatchCreateTasks stream silent this long is ended (DEADLINE_EXCEEDED, nothing written)",
    )
    stream_max_seconds: float = setting(
        "TASKSERVICE_STREAM_MAX_SECONDS",
        60.0,
        seconds(1, 3600),
        "a BatchCreateTasks stream longer than this in all is ended (DEADLINE_EXCEEDED,"
        " nothing written)",
    )
    max_concurrent_rpcs: int = setting(
        "TASKSERVICE_MAX_CONCURRENT_RPCS",
        1000,
        integer(1, 100_000),
        "TaskService calls in flight; beyond, RESOURCE_EXHAUSTED at once. Calls refused by"
        " auth never count, and health Check is never refused",
    )
    max_tool_streams: int = setting(
        "TASKSERVICE_MAX_TOOL_STREAMS",
        100,
        integer(1, 100_000),
        "open health Watch and reflection streams, counted apart from TaskService calls;"
        " beyond, RESOURCE_EXHAUSTED",
    )
    tool_stream_idle_seconds: float = setting(
        "TASKSERVICE_TOOL_STREAM_IDLE_SECONDS",
        300.0,
        seconds(1, 86_400),
        "such a stream with no message this long is ended (UNAVAILABLE, reopen it)",
    )
    max_watchers: int = setting(
        "TASKSERVICE_MAX_WATCHERS",
        1000,
        integer(1, 100_000),
        "open WatchTasks streams, counted apart from calls; beyond, RESOURCE_EXHAUSTED"
        " (TOO_MANY_WATCHERS)",
    )
    watch_progress_seconds: float = setting(
        "TASKSERVICE_WATCH_PROGRESS_SECONDS",
        30.0,
        seconds(1, 3600),
        "a WatchTasks stream without an event this long gets a PROGRESS event",
    )
    watch_max_seconds: float = setting(
        "TASKSERVICE_WATCH_MAX_SECONDS",
        3300.0,
        seconds(5, 86_400),
        "a WatchTasks stream is ended at this age (UNAVAILABLE STREAM_MAX_AGE, with a resume"
        " token): below Cloud Run's request timeout (3600 s in deploy/service.yaml)",
    )
    watch_buffer: int = setting(
        "TASKSERVICE_WATCH_BUFFER",
        1000,
        integer(1, 1_000_000),
        "live events a WatchTasks stream may fall behind its reader before it is ended"
        " (RESOURCE_EXHAUSTED WATCHER_TOO_SLOW); also at most 4 MiB",
    )
    watch_memory_mb: int = setting(
        "TASKSERVICE_WATCH_MEMORY_MB",
        0,
        integer(1, 1_000_000),
        "what all WatchTasks streams of a process together may buffer for readers behind"
        " (each event counted at twice its encoded size plus 512 bytes, what it costs);"
        " past it, the streams furthest behind are ended (RESOURCE_EXHAUSTED"
        " WATCHER_TOO_SLOW, with a resume token). With deploy/service.yaml's 512 MiB: 128;"
        " 100 and 1000 watchers that stop reading while a maximum-size task is updated 400"
        " times peaked the server at 177 and 287 MB RSS (735 MB at 100 without the bound)",
        shown="a quarter of the container's memory limit (cgroup), shared by the workers;"
        f" {DEFAULT_WATCH_MEMORY_MB} without a limit",
    )
    watch_retention_seconds: float = setting(
        "TASKSERVICE_WATCH_RETENTION_SECONDS",
        3600.0,
        seconds(1, 30 * 86_400),
        "how long resume tokens stay valid: SQLite keeps its change log this long;"
        f" Firestore allows at most {FIRESTORE_MAX_RETENTION_SECONDS} (its reads in the past"
        " go back an hour)",
    )
    workers: int = setting(
        "TASKSERVICE_WORKERS",
        1,
        worker_count,
        "server processes sharing the port (SO_REUSEPORT), supervised by the first (see"
        " docs on scaling out); auto: the CPUs of the container's cgroup quota",
    )
    telemetry: str = setting(
        "TASKSERVICE_TELEMETRY",
        "off",
        choice("off", "otlp", "gcp"),
        "otlp: OpenTelemetry metrics and traces to a collector; gcp: the same, to Google's"
        " Telemetry API (Cloud Monitoring and Cloud Trace; deploy.sh sets gcp)",
    )
    otlp_endpoint: str = setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://localhost:4317",
        matching(
            r"https?://[^/\s]+(:\d+)?/?",
            "must be http://host:port (plaintext) or https://host:port",
        ),
        "the collector for otlp (OTLP over gRPC; http:// is plaintext, https:// TLS). With"
        f" gcp: {GCP_TELEMETRY_ENDPOINT} unless set, and only https://",
    )
    trace_sample_ratio: float = setting(
        "TASKSERVICE_TRACE_SAMPLE_RATIO",
        0.01,
        number(0.0, 1.0),
        "the share of calls traced when the caller sent no trace header; a caller's own"
        " sampling decision (traceparent, x-cloud-trace-context) is always followed, so on"
        " Cloud Run (a traceparent on every request) it never applies. A traced call costs"
        " about 250 µs of server CPU (its spans, and exporting them)",
    )
    metrics_interval_seconds: float = setting(
        "TASKSERVICE_METRICS_INTERVAL_SECONDS",
        60.0,
        number(0.1, 3600.0),
        "how often metrics are exported (at least 10 with gcp)",
    )
    service_name: str = setting(
        "K_SERVICE",
        "taskservice",
        text,
        "set by Cloud Run; selects the Firestore store and names the service in telemetry",
        shown="unset (taskservice)",
        platform=True,
    )
    revision: str = setting(
        "K_REVISION",
        "",
        text,
        "set by Cloud Run; names this instance's revision in telemetry",
        platform=True,
    )
    worker: WorkerSlot | None = setting(
        "TASKSERVICE_WORKER",
        None,
        worker_slot,
        "set by the supervisor for each worker (slot/count/readiness file); do not set",
        platform=True,
    )

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


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(
        env=f.metadata["env"],
        attribute=f.name,
        default=f.default,
        parse=f.metadata["parse"],
        meaning=f.metadata["meaning"],
        shown_default=f.metadata["shown"],
        flag=f.metadata["flag"],
        platform=f.metadata["platform"],
    )
    for f in fields(Config)
)
FLAGS = {s.flag: s.env for s in SETTINGS if s.flag}
_GOOGLE_CLOUD = ("K_SERVICE", "GOOGLE_CLOUD_PROJECT", "GCP_PROJECT")


def load(env: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Config:
    """Reads TaskService's settings from `env` (os.environ), with `overrides`
    (keyed by variable name: the command-line flags) taking precedence."""
    env = {**env, **(overrides or {})}
    if not env.get("GOOGLE_CLOUD_PROJECT", "").strip() and env.get("GCP_PROJECT", "").strip():
        env["GOOGLE_CLOUD_PROJECT"] = env["GCP_PROJECT"]  # the older name
    # Config's keyword arguments, each setting its own type, which a dict
    # cannot say (each came from that setting's parser): Config(**values).
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = env.get(s.env)
        if raw is None or not raw.strip():
            if raw is not None and not s.platform:
                raise ConfigError(
                    f"{s.env} is set but empty; unset it for the default ({s.shown_default})"
                )
            continue
        values[s.attribute] = s.parse(s.env, raw.strip())
    # What one setting's default or bounds take from others.
    on_google_cloud = any(env.get(k, "").strip() for k in _GOOGLE_CLOUD)
    emulator = values.get("firestore_emulator_host", "")
    if "store" not in values and (on_google_cloud or emulator):
        values["store"] = "firestore"
    firestore = values.get("store") == "firestore"
    if firestore and emulator and not values.get("project"):
        values["project"] = DEFAULT_EMULATOR_PROJECT
    if values.get("telemetry") == "gcp" and "otlp_endpoint" not in values:
        values["otlp_endpoint"] = GCP_TELEMETRY_ENDPOINT
    config = Config(**values)
    if config.auth == "google-id-token":
        if not config.audience:
            raise ConfigError("TASKSERVICE_AUTH=google-id-token needs TASKSERVICE_AUDIENCE")
        if not config.allowed_callers:
            raise ConfigError(
                "TASKSERVICE_AUTH=google-id-token needs TASKSERVICE_ALLOWED_CALLERS (emails)"
            )
    if config.watch_progress_seconds >= config.watch_max_seconds:
        raise ConfigError(
            f"TASKSERVICE_WATCH_PROGRESS_SECONDS={config.watch_progress_seconds:g} must be less"
            f" than TASKSERVICE_WATCH_MAX_SECONDS={config.watch_max_seconds:g}: a stream must"
            " see a progress event"
        )
    if firestore and config.watch_retention_seconds > FIRESTORE_MAX_RETENTION_SECONDS:
        if "watch_retention_seconds" in values:
            raise ConfigError(
                "TASKSERVICE_WATCH_RETENTION_SECONDS="
                f"{config.watch_retention_seconds:g} is more than Firestore allows"
                f" ({FIRESTORE_MAX_RETENTION_SECONDS}: its reads in the past go back an hour)"
            )
        values["watch_retention_seconds"] = float(FIRESTORE_MAX_RETENTION_SECONDS)
    if config.telemetry == "gcp" and not config.otlp_endpoint.startswith("https://"):
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_ENDPOINT={config.otlp_endpoint!r}: TASKSERVICE_TELEMETRY=gcp"
            " sends credentials, so only over TLS (https://)"
        )
    if config.telemetry == "gcp" and config.metrics_interval_seconds < 10:
        raise ConfigError(
            "TASKSERVICE_METRICS_INTERVAL_SECONDS="
            f"{config.metrics_interval_seconds:g} is too short for Cloud Monitoring (at least 10)"
        )
    return Config(**values)


def settings_help() -> str:
    """The settings table for --help: variable, meaning, default."""
    return _render.settings_help(SETTINGS)


def settings_markdown() -> str:
    """docs/configuration.md: every setting, from the same declarations."""
    return _render.settings_markdown(SETTINGS)
