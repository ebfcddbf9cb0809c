"""The wire side of tasks.v1.TaskService: the call pipeline every call passes
through (admission, auth, access line, stream pump), the servicer, conversion
between protobuf and domain values, error statuses, health, reflection and the
WatchTasks streams. Protobuf stops here: the stores see domain dataclasses.

Authentication (auth.py) is imported by path, and only when it is on.
"""

from taskservice.api import health, reflection
from taskservice.api.calls import CallGate, CallLimits, CallPipeline, PipelineRegistrar
from taskservice.api.health import HealthService
from taskservice.api.service import TaskServicer
from taskservice.api.watching import WatchSettings

__all__ = [
    "CallGate",
    "CallLimits",
    "CallPipeline",
    "HealthService",
    "PipelineRegistrar",
    "TaskServicer",
    "WatchSettings",
    "health",
    "reflection",
]
