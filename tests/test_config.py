"""Unit tests of taskservice.config: reading settings, without a process."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from taskservice import config
from taskservice.config import (
    DEFAULT_WATCH_MEMORY_MB,
    SETTINGS,
    Config,
    ConfigError,
    default_watch_memory_mb,
    load,
    settings_help,
)


def test_defaults() -> None:
    config = load({})
    assert config == Config()
    assert config.address == "[::]:8080" and config.store == "sqlite"


@pytest.mark.parametrize(
    ("env", "store", "project"),
    [
        ({}, "sqlite", ""),
        ({"K_SERVICE": "taskservice"}, "firestore", ""),
        ({"GOOGLE_CLOUD_PROJECT": "my-project"}, "firestore", "my-project"),
        ({"GCP_PROJECT": "my-project"}, "firestore", "my-project"),
        ({"FIRESTORE_EMULATOR_HOST": "127.0.0.1:8081"}, "firestore", "demo-taskservice"),
        ({"K_SERVICE": "x", "TASKSERVICE_STORE": "SQLite"}, "sqlite", ""),
        ({"GOOGLE_CLOUD_PROJECT": ""}, "sqlite", ""),  # set by a platform, empty: unset
    ],
)
def test_the_store_follows_the_environment(env: dict[str, str], store: str, project: str) -> None:
    config = load(env)
    assert (config.store, config.project) == (store, project)


def test_overrides_win_over_the_environment() -> None:
    config = load(
        {"PORT": "9000", "TASKSERVICE_STORE": "firestore"},
        {"PORT": "9100", "TASKSERVICE_STORE": "sqlite", "TASKSERVICE_SQLITE_PATH": "/x/t.db"},
    )
    assert (config.port, config.store, config.sqlite_path) == (9100, "sqlite", "/x/t.db")


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"PORT": ""}, "PORT is set but empty; unset it for the default (8080)"),
        ({"TASKSERVICE_STORE": " "}, "TASKSERVICE_STORE is set but empty"),
        ({"PORT": "x"}, "PORT='x' is not an integer"),
        ({"PORT": "-1"}, "outside 0..65535"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD' must be one of DEBUG, INFO, WARNING, ERROR"),
        ({"TASKSERVICE_STORE": "mongo"}, "must be 'sqlite' or 'firestore'"),
        ({"FIRESTORE_EMULATOR_HOST": "localhost"}, "must be host:port"),
        ({"TASKSERVICE_GRACE_SECONDS": "61"}, "outside 0..60"),
        ({"TASKSERVICE_CERTS_URL": "http://example.com/certs"}, "must be https"),
        ({"TASKSERVICE_MAX_WATCHERS": "0"}, "TASKSERVICE_MAX_WATCHERS=0 is outside 1..100000"),
        ({"TASKSERVICE_WATCH_BUFFER": "many"}, "TASKSERVICE_WATCH_BUFFER='many' is not an integer"),
        (
            {"TASKSERVICE_WATCH_PROGRESS_SECONDS": "60", "TASKSERVICE_WATCH_MAX_SECONDS": "60"},
            "must be less than TASKSERVICE_WATCH_MAX_SECONDS=60",
        ),
        (
            {"TASKSERVICE_STORE": "firestore", "TASKSERVICE_WATCH_RETENTION_SECONDS": "7200"},
            "is more than Firestore allows (3540",
        ),
        ({"TASKSERVICE_TELEMETRY": "jaeger"}, "TASKSERVICE_TELEMETRY='jaeger' must be 'off' or"),
        (
            {"TASKSERVICE_TRACE_SAMPLE_RATIO": "2"},
            "TASKSERVICE_TRACE_SAMPLE_RATIO=2 is outside 0..1",
        ),
        ({"TASKSERVICE_TRACE_SAMPLE_RATIO": "half"}, "'half' is not a number"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317"}, "must be http://host:port"),
        (
            {"TASKSERVICE_TELEMETRY": "gcp", "TASKSERVICE_METRICS_INTERVAL_SECONDS": "5"},
            "too short for Cloud Monitoring (at least 10)",
        ),
    ],
)
def test_bad_settings_say_what_to_do(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_watch_settings() -> None:
    default = load({})
    assert (default.max_watchers, default.watch_buffer) == (1000, 1000)
    assert (default.watch_progress_seconds, default.watch_max_seconds) == (30.0, 3300.0)
    assert default.watch_retention_seconds == 3600.0  # SQLite keeps its log an hour
    # Firestore reads in the past go back an hour at most: its default is capped.
    firestore = load({"TASKSERVICE_STORE": "firestore", "GOOGLE_CLOUD_PROJECT": "my-project"})
    assert firestore.watch_retention_seconds == config.FIRESTORE_MAX_RETENTION_SECONDS
    tuned = load(
        {
            "TASKSERVICE_MAX_WATCHERS": "5",
            "TASKSERVICE_WATCH_PROGRESS_SECONDS": "2",
            "TASKSERVICE_WATCH_MAX_SECONDS": "10",
            "TASKSERVICE_WATCH_BUFFER": "7",
            "TASKSERVICE_WATCH_RETENTION_SECONDS": "86400",
        }
    )
    assert (tuned.max_watchers, tuned.watch_buffer) == (5, 7)
    assert (tuned.watch_progress_seconds, tuned.watch_max_seconds) == (2.0, 10.0)
    assert tuned.watch_retention_seconds == 86400.0


def test_telemetry_settings() -> None:
    default = load({})
    assert (default.telemetry, default.trace_sample_ratio) == ("off", 0.01)
    assert default.otlp_endpoint == "http://localhost:4317"
    assert default.metrics_interval_seconds == 60.0
    on = load(
        {
            "TASKSERVICE_TELEMETRY": "OTLP",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.internal:4317",
            "TASKSERVICE_TRACE_SAMPLE_RATIO": "0.25",
            "TASKSERVICE_METRICS_INTERVAL_SECONDS": "5",
            "K_SERVICE": "tasks",
            "K_REVISION": "tasks-00042-abc",
        }
    )
    assert (on.telemetry, on.otlp_endpoint) == ("otlp", "https://collector.internal:4317")
    assert (on.trace_sample_ratio, on.metrics_interval_seconds) == (0.25, 5.0)
    assert (on.service_name, on.revision) == ("tasks", "tasks-00042-abc")
    # gcp: OTLP to Google's Telemetry API unless told otherwise; credentials need TLS
    google = load({"TASKSERVICE_TELEMETRY": "gcp"})
    assert google.otlp_endpoint == "https://telemetry.googleapis.com"
    with pytest.raises(ConfigError, match="only over TLS"):
        load({"TASKSERVICE_TELEMETRY": "gcp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})


def test_log_level_is_read_in_any_case() -> None:
    assert load({"LOG_LEVEL": "warning"}).log_level == "WARNING"


def test_every_setting_is_documented_in_help() -> None:
    text = settings_help()
    for setting in SETTINGS:
        assert setting.env in text and setting.meaning in text
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    # Every field of Config is a declared setting, and load() reads nothing
    # else but GCP_PROJECT (GOOGLE_CLOUD_PROJECT's older name).
    assert [s.attribute for s in SETTINGS] == [f.name for f in dataclasses.fields(Config)]
    source = inspect.getsource(config.load)
    read = set(re.findall(r'env(?:\.get)?\(?\[?"([A-Z][A-Z0-9_]+)"', source))
    assert read - {s.env for s in SETTINGS} == {"GCP_PROJECT"}
    assert len(SETTINGS) >= 30


def test_each_default_is_declared_once() -> None:
    """The default a setting's declaration holds is Config's, load()'s and the
    one --help shows."""
    for setting in SETTINGS:
        assert getattr(Config(), setting.attribute) == setting.default
        assert getattr(load({}), setting.attribute) == setting.default
    assert "default: 8080" in settings_help()
    assert "default: 8\n" in settings_help() + "\n"  # the grace, in whole seconds


def test_the_configuration_doc_is_generated_from_the_declarations() -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == config.settings_markdown(), (
        "docs/configuration.md is stale: python -m taskservice.config > docs/configuration.md"
    )
    for setting in SETTINGS:
        assert f"`{setting.env}`" in doc.read_text()


def test_watch_memory_follows_the_container_memory_limit(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{512 * 2**20}\n")
    assert default_watch_memory_mb(1, v2) == 128  # a quarter of a 512 MiB instance
    assert default_watch_memory_mb(2, v2) == 64  # shared by two workers
    (v2 / "memory.max").write_text("max\n")
    assert default_watch_memory_mb(1, v2) == DEFAULT_WATCH_MEMORY_MB
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert default_watch_memory_mb(1, v1) == DEFAULT_WATCH_MEMORY_MB
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    assert default_watch_memory_mb(1, v1) == 512
    assert default_watch_memory_mb(1, tmp_path / "none") == DEFAULT_WATCH_MEMORY_MB
    assert load({"TASKSERVICE_WATCH_MEMORY_MB": "64"}).watch_memory_bytes() == 64 * 2**20
    with pytest.raises(ConfigError):
        load({"TASKSERVICE_WATCH_MEMORY_MB": "0"})


def test_the_layers_settings_take_their_defaults_from_the_declarations() -> None:
    """CallLimits, WatchSettings and TelemetrySettings hold no defaults of
    their own: theirs are the declared settings'."""
    from taskservice.api._admission import CallLimits
    from taskservice.api.watching import WatchSettings
    from taskservice.observe._export import TelemetrySettings

    declared = Config()
    limits = CallLimits()
    assert (limits.max_calls, limits.max_watchers, limits.max_tool_streams) == (
        declared.max_concurrent_rpcs,
        declared.max_watchers,
        declared.max_tool_streams,
    )
    assert limits.tool_stream_idle_seconds == declared.tool_stream_idle_seconds
    watch = WatchSettings()
    assert (watch.progress_seconds, watch.max_seconds, watch.buffer_events) == (
        declared.watch_progress_seconds,
        declared.watch_max_seconds,
        declared.watch_buffer,
    )
    assert watch.memory_bytes == DEFAULT_WATCH_MEMORY_MB * 2**20
    telemetry = TelemetrySettings("otlp")
    assert (telemetry.otlp_endpoint, telemetry.sample_ratio, telemetry.service) == (
        declared.otlp_endpoint,
        declared.trace_sample_ratio,
        declared.service_name,
    )
