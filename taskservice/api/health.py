"""grpc.health.v1.Health: Check and Watch over the serving status TaskServer sets.

Watch is an async generator (the first status, then each change), so the call
pipeline can end it when the server starts draining and bound how long it may
sit idle; Check answers from a dict and never waits. An unknown service is
NOT_FOUND on Check and SERVICE_UNKNOWN on Watch, as the health protocol says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeAlias

from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskservice.api._access import Context
from taskservice.domain.errors import NotFound

SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
ServingStatus: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus.ValueType


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The serving status of each service name ("" is the whole server)."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self._status: dict[str, ServingStatus] = dict.fromkeys(("", *services), NOT_SERVING)
        self._changed = asyncio.Event()
        self._final = False

    def set_all(self, status: ServingStatus, *, final: bool = False) -> None:
        """Sets every service's status; after final=True nothing changes it."""
        if self._final:
            return
        self._final = final
        for name in self._status:
            self._status[name] = status
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def status(self, service: str = "") -> ServingStatus:
        return self._status.get(service, SERVICE_UNKNOWN)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            raise NotFound(f"unknown service {request.service[:100]!r}", reason="SERVICE_NOT_FOUND")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            changed = self._changed  # before reading, so no change is missed
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await changed.wait()
