"""The standard ``grpc.health.v1.Health`` service, driven by the backends' readiness.

Unlike the stock servicer, :meth:`HealthService.close` ends open ``Watch`` streams after telling
them NOT_SERVING, so a server's graceful stop waits for real calls only, not for watchers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: A ``grpc.health.v1.HealthCheckResponse.ServingStatus`` value.
ServingStatus = int
SERVING: ServingStatus = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: ServingStatus = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: ServingStatus = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
UNKNOWN: ServingStatus = health_pb2.HealthCheckResponse.UNKNOWN

HEALTH_SERVICE = "grpc.health.v1.Health"

_RESPONSES = {s: health_pb2.HealthCheckResponse(status=s) for s in (SERVING, NOT_SERVING)}


def _response(status: ServingStatus) -> health_pb2.HealthCheckResponse:
    return _RESPONSES.get(status) or health_pb2.HealthCheckResponse(status=status)


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Per-service serving status; ``""`` is the whole server."""

    def __init__(self) -> None:
        self._status: dict[str, ServingStatus] = {"": NOT_SERVING}
        self._changed: dict[str, asyncio.Event] = {}
        self._frozen = False
        self._closing = False

    def status(self, service: str = "") -> ServingStatus | None:
        return self._status.get(service)

    def set(self, service: str, status: ServingStatus) -> None:
        """Record a status and wake the watchers of that service. Ignored once closing."""
        if self._frozen or self._status.get(service) == status:
            return
        self._status[service] = status
        event = self._changed.pop(service, None)
        if event is not None:
            event.set()

    def shutdown(self) -> None:
        """Mark every service NOT_SERVING for good; watchers are told and stay connected."""
        for service in self._status:
            self.set(service, NOT_SERVING)
        self._frozen = True

    def close(self) -> None:
        """Shut down and end the Watch streams, so they do not hold up a graceful stop."""
        self.shutdown()
        self._closing = True
        for event in self._changed.values():
            event.set()
        self._changed.clear()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return _response(status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        service = request.service
        last: ServingStatus | None = None
        while True:
            status = self._status.get(service, SERVICE_UNKNOWN)
            if status != last:
                yield _response(status)
                last = status
            if self._closing:
                return
            event = self._changed.get(service)
            if event is None:
                event = self._changed[service] = asyncio.Event()
            await event.wait()
