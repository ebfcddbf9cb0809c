"""Whether the server's address can be bound, checked with a plain socket.

Before gRPC binds, so that a busy port is one clear line rather than gRPC
core's log and a traceback; and before a supervisor starts workers (it must
not create any gRPC state itself).
"""

from __future__ import annotations

import errno
import socket


def check_bindable(host: str, port: int) -> None:
    """Raises OSError, saying what to do, when host:port cannot be bound (it
    is checked with a plain socket first, so that a busy port is one clear
    line rather than gRPC core's log and a traceback)."""
    if port == 0:
        return
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind((bare, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise OSError(
                f"port {port} is already in use (another server?); stop it, or choose another"
                " port with --port or PORT"
            ) from None
        if err.errno == errno.EACCES:
            raise OSError(
                f"no permission to listen on port {port}; use a port above 1023"
            ) from None
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
