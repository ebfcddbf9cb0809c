"""Entry point: `python -m taskservice` (or `taskservice`) serves until SIGTERM
or SIGINT.

--help lists every setting with its environment variable and default, and
exits without binding; --version prints the version; --port, --store and
--sqlite-path override their environment variables. Whatever stops the
server from starting (a bad setting, a busy port, a SQLite path that cannot
hold the database, no Google credentials for the Firestore store) prints one
line that says what to do and exits 2: no traceback, no gRPC core log. A clean shutdown exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from taskservice import __version__
from taskservice.config import FLAGS, Config, ConfigError, load, settings_help
from taskservice.observe import jsonlog

log = logging.getLogger("taskservice")

NO_CREDENTIALS = (
    "no Google credentials for the Firestore store: run `gcloud auth application-default"
    " login` (in a container: mount a key and set GOOGLE_APPLICATION_CREDENTIALS), or set"
    " FIRESTORE_EMULATOR_HOST=host:port to use the emulator, or use the SQLite store"
    " (--store sqlite, or TASKSERVICE_STORE=sqlite)"
)


class StartupError(Exception):
    """The server cannot start; the message is one line that says what to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"taskservice: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskservice",
        description="Serves tasks.v1.TaskService (gRPC over h2c) until SIGTERM or SIGINT.",
        epilog="settings (environment variables; every value is checked at start, and a bad"
        " one stops the server with one line and exit status 2):\n" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"taskservice {__version__}")
    parser.add_argument("--port", metavar="N", help="listen port (overrides PORT)")
    parser.add_argument(
        "--store",
        choices=("sqlite", "firestore"),
        help="the store (overrides TASKSERVICE_STORE)",
    )
    parser.add_argument(
        "--sqlite-path", metavar="PATH", help="the SQLite file (overrides TASKSERVICE_SQLITE_PATH)"
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    found = {}
    for flag, env in FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            found[env] = value
    return found


async def serve(config: Config) -> None:
    from taskservice.runtime.server import TaskServer, wait_for_stop_signal

    try:
        if config.store == "firestore" and not config.project:
            from taskservice.store.channels import discover_project

            config = dataclasses.replace(config, project=discover_project())
        server = TaskServer(config)
    except ConfigError as err:
        raise StartupError(str(err)) from None
    except Exception as err:
        if type(err).__name__ == "DefaultCredentialsError":  # google.auth, imported lazily
            raise StartupError(NO_CREDENTIALS) from None
        raise
    try:
        await server.start()
    except OSError as err:
        await server.store.close()
        raise StartupError(str(err)) from None
    await wait_for_stop_signal()
    log.info("shutdown requested; draining for up to %.0f s", config.grace_seconds)
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(os.environ, _overrides(args))
    except ConfigError as err:
        print(f"taskservice: configuration error: {err}", file=sys.stderr)
        return 2
    jsonlog.configure(config.log_level, config.access_log)
    if config.store == "sqlite":
        from taskservice.store.sqlite import unusable_reason

        why = unusable_reason(config.sqlite_path)
        if why is not None:
            print(
                f"taskservice: cannot start: the SQLite file {config.sqlite_path} {why}; give"
                " another --sqlite-path (TASKSERVICE_SQLITE_PATH)",
                file=sys.stderr,
            )
            return 2
    if config.workers > 1 and config.worker is None:
        from taskservice.runtime.supervisor import supervise

        if config.port == 0:
            print(
                "taskservice: cannot start: TASKSERVICE_WORKERS needs a fixed PORT", file=sys.stderr
            )
            return 2
        try:
            return supervise(config, sys.argv[1:] if argv is None else list(argv))
        except OSError as err:
            print(f"taskservice: cannot start: {err}", file=sys.stderr)
            return 2
    try:
        asyncio.run(serve(config))
    except StartupError as err:
        print(f"taskservice: cannot start: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
