"""Settings from the environment, read and validated once at start.

Bad configuration raises ConfigError, whose message is one line fit to print.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_COLLECTION = re.compile(r"[A-Za-z0-9_-]{1,100}")
_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]|demo-[a-z0-9-]{1,60}")
DEFAULT_EMULATOR_PROJECT = "demo-taskservice"
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"


class ConfigError(ValueError):
    """A setting is missing or malformed."""


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "[::]"
    port: int = 8080
    store: str = "sqlite"  # "sqlite" or "firestore"
    sqlite_path: str = "./tasks.db"
    project: str = ""  # Firestore project; "" = discover from credentials
    firestore_database: str = "(default)"
    collection: str = "tasks"
    grace_seconds: float = 8.0  # in-flight calls get this long after SIGTERM
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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


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


def load(env: Mapping[str, str]) -> Config:
    """Reads the settings that TaskService takes from `env` (os.environ)."""
    port = _int(env, "PORT", 8080, 0, 65535)
    store = env.get("TASKSERVICE_STORE", "").strip().lower()
    cloudy = any(env.get(k) for k in ("K_SERVICE", "GOOGLE_CLOUD_PROJECT", "GCP_PROJECT"))
    emulator = env.get("FIRESTORE_EMULATOR_HOST", "").strip()
    if not store:
        store = "firestore" if cloudy or emulator else "sqlite"
    if store not in ("sqlite", "firestore"):
        raise ConfigError(f"TASKSERVICE_STORE={store!r} must be 'sqlite' or 'firestore'")
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
    auth = env.get("TASKSERVICE_AUTH", "").strip().lower() or "none"
    if auth not in ("none", "google-id-token"):
        raise ConfigError(f"TASKSERVICE_AUTH={auth!r} must be 'none' or 'google-id-token'")
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
    reflection = env.get("TASKSERVICE_REFLECTION", "").strip().lower() or "on"
    if reflection not in ("on", "off"):
        raise ConfigError(f"TASKSERVICE_REFLECTION={reflection!r} must be 'on' or 'off'")
    idle = _int(env, "TASKSERVICE_STREAM_IDLE_SECONDS", 10, 1, 3600)
    stream_max = _int(env, "TASKSERVICE_STREAM_MAX_SECONDS", 60, 1, 3600)
    max_rpcs = _int(env, "TASKSERVICE_MAX_CONCURRENT_RPCS", 1000, 1, 100_000)
    max_tool_streams = _int(env, "TASKSERVICE_MAX_TOOL_STREAMS", 100, 1, 100_000)
    tool_idle = _int(env, "TASKSERVICE_TOOL_STREAM_IDLE_SECONDS", 300, 1, 86_400)
    return Config(
        host=host,
        port=port,
        store=store,
        sqlite_path=sqlite_path,
        project=project,
        firestore_database=database,
        collection=collection,
        grace_seconds=float(grace),
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
    )
