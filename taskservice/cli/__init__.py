"""taskctl: TaskService from the command line, for people and scripts.

    taskctl create "Write the runbook" --priority high --tag ops --id runbook
    taskctl list --filter 'state = STATE_OPEN' --all
    taskctl update runbook --state done --if-unchanged
    taskctl get runbook --field etag
    taskctl export > tasks.jsonl    # every task, one JSON object per line
    taskctl import tasks.jsonl      # restores an export exactly; safe to re-run
    taskctl export | taskctl --target other:8080 import -   # a move between stores
    taskctl watch --filter 'assignee = "ana"' --initial   # live, until Ctrl-C

The target comes from --target or TASKCTL_TARGET (default localhost:8080); a
*.run.app target gets TLS and a Google ID token (see taskservice.client).
Global flags (--target, --json, --timeout, --id-token) go before or after the
subcommand. Output is a table unless --json (JSON in the API's own shapes) or
--field NAME (that field of each task, one per line). Exit status: 0 ok, 1 a
call failed, 2 usage; a closed pipe (`| head`) ends quietly.

Import restores what export wrote, and can be run again safely
(taskservice.cli._import). Each subcommand is a function of
taskservice.cli._commands, bound to its subparser with set_defaults(func=...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

# gRPC core reads its log level once, when it loads: keep its INFO lines out
# of taskctl's output (a TLS handshake failure logs one per connection
# attempt); every failure reaches the user as one line of taskctl's own.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from taskservice.cli import _commands as commands
from taskservice.cli._import import CHUNK
from taskservice.cli._output import (
    DEFAULT_TARGET,
    FIELDS,
    PRIORITY_FLAG,
    STATE_FLAG,
    CliError,
    Output,
    describe_error,
)
from taskservice.client import (
    TaskClient,
    Unreachable,
    bearer_token_credentials,
    connect,
)

__all__ = ["build_parser", "main", "run"]

# A subcommand: (client, args, output, out, err) -> exit status.
Command = Callable[[TaskClient, argparse.Namespace, Output, TextIO, TextIO], Awaitable[int]]


async def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    output = Output(args.json, out, getattr(args, "field", None))
    credentials = bearer_token_credentials(args.id_token) if args.id_token else None
    command: Command = args.func
    async with connect(args.target, call_credentials=credentials) as client:
        await client.connected(args.timeout)
        return await command(client, args, output, out, err)


def _global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The flags every subcommand takes, before or after it: the top-level
    parser holds the defaults, the subcommands add them with SUPPRESS so that
    a value given before the subcommand is not reset."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--target",
        default=default(os.environ.get("TASKCTL_TARGET", DEFAULT_TARGET)),
        help="host:port or https URL (env TASKCTL_TARGET; default localhost:8080)",
    )
    parser.add_argument(
        "--id-token",
        default=default(os.environ.get("TASKCTL_ID_TOKEN")),
        help="bearer ID token for a TLS target (env TASKCTL_ID_TOKEN); default: fetched",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="JSON (in the API's shapes) instead of a table",
    )
    parser.add_argument(
        "--timeout", type=float, default=default(10.0), help="seconds per call (default 10)"
    )


_PRIORITY_HELP = "low, medium, high or critical (any case; PRIORITY_HIGH works too)"
_STATE_HELP = "open, in_progress, done or cancelled (any case; STATE_DONE works too)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskctl", description="Talk to a TaskService.")
    _global_flags(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, top=False)
    shows = argparse.ArgumentParser(add_help=False)
    shows.add_argument(
        "--field", choices=FIELDS, help="print only this field of each task, one per line"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    create = sub.add_parser("create", parents=[common, shows], help="create a task")
    create.set_defaults(func=commands.create)
    create.add_argument("title")
    create.add_argument("--description")
    create.add_argument("--priority", type=PRIORITY_FLAG, metavar="PRIORITY", help=_PRIORITY_HELP)
    create.add_argument("--assignee")
    create.add_argument("--tag", action="append", default=[])
    create.add_argument("--id", help="task id (default: the server picks one)")
    create.add_argument("--request-id", help="UUID making the create idempotent (default: new)")

    get = sub.add_parser("get", parents=[common, shows], help="show a task")
    get.set_defaults(func=commands.get)
    get.add_argument("task", help="task id or tasks/{id}")

    lst = sub.add_parser("list", parents=[common, shows], help="list tasks")
    lst.set_defaults(func=commands.list_tasks)
    lst.add_argument("--filter", help='e.g. state = STATE_OPEN AND tags:"ops"')
    lst.add_argument("--order-by", help='"create_time desc" (default), "update_time", ...')
    lst.add_argument("--page-size", type=int, default=0)
    lst.add_argument("--page-token")
    lst.add_argument("--all", action="store_true", help="every page")

    update = sub.add_parser("update", parents=[common, shows], help="change fields of a task")
    update.set_defaults(func=commands.update)
    update.add_argument("task")
    update.add_argument("--title")
    update.add_argument("--description")
    update.add_argument("--priority", type=PRIORITY_FLAG, metavar="PRIORITY", help=_PRIORITY_HELP)
    update.add_argument("--state", type=STATE_FLAG, metavar="STATE", help=_STATE_HELP)
    update.add_argument("--assignee", help='"" clears it')
    update.add_argument("--tag", action="append", help="replaces all tags (repeat)")
    update.add_argument("--clear-tags", action="store_true")
    guard = update.add_mutually_exclusive_group()
    guard.add_argument("--etag", help="fail with ABORTED unless this is the current etag")
    guard.add_argument(
        "--if-unchanged",
        action="store_true",
        help="read the current etag first and update only that version",
    )

    delete = sub.add_parser("delete", parents=[common], help="delete a task")
    delete.set_defaults(func=commands.delete)
    delete.add_argument("task")
    delete.add_argument("--etag")

    imp = sub.add_parser(
        "import", parents=[common], help="restore tasks from a JSONL file (export's output)"
    )
    imp.set_defaults(func=commands.import_tasks)
    imp.add_argument("file", help="the JSONL file; - reads stdin")
    imp.add_argument(
        "--chunk-size", type=int, default=CHUNK, choices=range(1, CHUNK + 1), metavar="N"
    )

    exp = sub.add_parser("export", parents=[common], help="write every task as JSON lines")
    exp.set_defaults(func=commands.export)
    exp.add_argument("--filter")
    exp.add_argument("--order-by")

    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="print changes to tasks as they happen, until Ctrl-C; then how to continue",
    )
    watch.set_defaults(func=commands.watch)
    watch.add_argument("--filter", help="as for list")
    watch.add_argument(
        "--initial", action="store_true", help="first print every matching task (as ADDED)"
    )
    watch.add_argument("--resume-token", help="continue after the event this token came with")
    watch.add_argument("--progress", action="store_true", help="also print PROGRESS events")
    watch.add_argument("--max-events", type=int, default=0, help="stop after N events")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args, sys.stdout, sys.stderr))
    except KeyboardInterrupt:  # Ctrl-C (taskctl watch prints how to continue first)
        return 130
    except BrokenPipeError:
        # The reader went away (`taskctl export | head -1`): end quietly, as
        # Unix tools do, without Python's own complaint when it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for such a tool
    except grpc.aio.AioRpcError as err:
        print(f"taskctl: {describe_error(err)}", file=sys.stderr)
        return 1
    except (CliError, OSError, ValueError, Unreachable) as err:
        print(f"taskctl: {err}", file=sys.stderr)
        return 2 if isinstance(err, CliError) else 1
