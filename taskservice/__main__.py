"""Entry point: `python -m taskservice` serves until SIGTERM or SIGINT.

Bad configuration prints one line and exits 2; a clean shutdown exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from taskservice import jsonlog
from taskservice.config import ConfigError, load

log = logging.getLogger("taskservice")


async def serve() -> None:
    from taskservice.server import TaskServer, wait_for_stop_signal

    config = load(os.environ)
    server = TaskServer(config)
    await server.start()
    await wait_for_stop_signal()
    log.info("shutdown requested; draining for up to %.0f s", config.grace_seconds)
    await server.stop()


def main() -> int:
    jsonlog.configure()
    try:
        asyncio.run(serve())
    except ConfigError as err:
        print(f"taskservice: configuration error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"taskservice: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
