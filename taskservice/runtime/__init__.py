"""The running process: the gRPC server that wires config, store, call pipeline
and servicer together (server), the supervisor that runs several worker
processes on one port (supervisor), and the port checks both make before
binding (ports).

Each is imported by path: the supervisor's parent process must not load
gRPC, which importing the server would."""

__all__ = ["ports", "server", "supervisor"]
