"""The harness that tests and benchmarks share: free ports, the real Cloud
Firestore emulator, TaskService servers (as processes or in-process), and a
counter of what a store sends to Firestore. tests/ and bench/ import from
here, never from each other."""

from harness.counting import CallCounter
from harness.emulator import (
    Emulator,
    emulator_jar,
    firestore_store,
    launch_emulator,
    start_emulator,
)
from harness.net import CuttableProxy, free_port, wait_for_port
from harness.servers import (
    FAST_RECONNECT,
    ProcessRunning,
    Running,
    ServerProcess,
    health_serving,
    server_env,
    start_process,
    start_server,
)

__all__ = [
    "FAST_RECONNECT",
    "CallCounter",
    "CuttableProxy",
    "Emulator",
    "ProcessRunning",
    "Running",
    "ServerProcess",
    "emulator_jar",
    "firestore_store",
    "free_port",
    "health_serving",
    "launch_emulator",
    "server_env",
    "start_emulator",
    "start_process",
    "start_server",
    "wait_for_port",
]
