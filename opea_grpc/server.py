"""MicroService: one ``grpc.aio`` server with health, reflection and the error interceptor.

>>> service = MicroService("rerank", service_type=ServiceType.RERANK)
>>> service.add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, MyReranker())
>>> port = await service.start()      # binds; port 0 picks a free one
>>> await service.stop(grace=5)       # NOT_SERVING, drain in-flight calls, close

With ``metrics_port`` in its config it counts and times every call (:mod:`opea_grpc.metrics`) and
serves them as Prometheus text on that port; tracing (:mod:`opea_grpc.telemetry`) adds a span per
call when the process has it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from opea_grpc.config import ServerConfig
from opea_grpc.health import HEALTH_SERVICE, NOT_SERVING, SERVING, HealthService
from opea_grpc.interceptor import guard
from opea_grpc.keys import ServiceKeys
from opea_grpc.metrics import RpcMetrics
from opea_grpc.metrics import serve as serve_metrics
from opea_grpc.reflection import enable_reflection
from opea_grpc.tls import server_credentials

log = logging.getLogger(__name__)

S = TypeVar("S")
Self = TypeVar("Self", bound="MicroService")

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    #: The context a servicer method receives (``grpc.aio.ServicerContext``).
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext

#: A backend's readiness: True when it can serve. May be a coroutine function.
Readiness = Callable[[], bool | Awaitable[bool]]
#: A start-up or shut-down step: open a model, an index, a connection pool; close it.
Hook = Callable[[], Awaitable[None]]
#: The ``add_FooServicer_to_server`` function that protoc generates.
AddToServer = Callable[[S, Any], None]


class ServiceRole(str, enum.Enum):
    """OPEA's service roles."""

    MICROSERVICE = "microservice"
    MEGASERVICE = "megaservice"


class ServiceType(str, enum.Enum):
    """OPEA's service types (the subset this project serves)."""

    GATEWAY = "gateway"
    EMBEDDING = "embedding"
    RETRIEVER = "retriever"
    RERANK = "rerank"
    LLM = "llm"
    DATAPREP = "dataprep"
    GUARDRAIL = "guardrail"
    UNDEFINED = "undefined"


@dataclass(frozen=True, slots=True)
class _Registration:
    name: str
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ready: Readiness | None


class _Recorder:
    """Stands in for a server while a generated ``add_*_to_server`` registers a servicer."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[object]) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(
        self, name: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.services.append((name, handlers))


def _server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    aged = (
        [
            ("grpc.max_connection_age_ms", int(cfg.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(cfg.grace * 1000)),
        ]
        if cfg.max_connection_age > 0
        else []
    )
    return [
        *aged,
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client keepalive pings down to every 5 s instead of answering with GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        # A port already in use must fail loudly, not be shared with another process.
        ("grpc.so_reuseport", 0),
    ]


class MicroService:
    """A gRPC server for one or more services, with health and reflection.

    The constructor does no I/O. ``start()`` binds and returns the port; ``stop(grace)`` sets
    every service NOT_SERVING, refuses new calls, lets in-flight calls finish within ``grace``
    seconds, then closes. ``async with`` does both.
    """

    def __init__(
        self,
        name: str,
        *,
        service_type: ServiceType = ServiceType.UNDEFINED,
        service_role: ServiceRole = ServiceRole.MICROSERVICE,
        config: ServerConfig | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        metrics: RpcMetrics | None = None,
    ) -> None:
        self.name = name
        self.service_type = service_type
        self.service_role = service_role
        self.config = config if config is not None else ServerConfig()
        self._interceptors = tuple(interceptors)
        self._registrations: list[_Registration] = []
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self._health = HealthService()
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._port: int | None = None
        #: Call metrics: given (the owner exposes them), or made at start when the config
        #: names a metrics port; None records nothing.
        self.metrics = metrics
        self._exposition: tuple[WSGIServer, threading.Thread] | None = None

    # -- registration -------------------------------------------------------------------------

    def add_service(
        self: Self, add_to_server: AddToServer[S], servicer: S, *, ready: Readiness | None = None
    ) -> Self:
        """Serve ``servicer`` through its generated ``add_*_to_server`` function.

        ``ready`` reports whether the backend behind it can serve; health follows it.
        """
        if self._server is not None:
            raise RuntimeError("add_service() must come before start()")
        recorder = _Recorder()
        add_to_server(servicer, recorder)
        if not recorder.services:
            raise ValueError(
                f"{add_to_server!r} registered no method handlers: "
                "regenerate the code with grpcio-tools >= 1.62"
            )
        known = {r.name for r in self._registrations}
        for name, handlers in recorder.services:
            if name in known:
                raise ValueError(f"service {name} is already registered")
            self._registrations.append(_Registration(name, dict(handlers), ready))
        return self

    def on_start(self: Self, hook: Hook) -> Self:
        """Run ``hook`` in ``start()``, before the port is bound (in the order added).

        An exception in it fails ``start()``; so does a port that cannot be bound, after the
        stop hooks have run.
        """
        self._on_start.append(hook)
        return self

    def on_stop(self: Self, hook: Hook) -> Self:
        """Run ``hook`` in ``stop()``, after in-flight calls have drained (in reverse order)."""
        self._on_stop.append(hook)
        return self

    @property
    def services(self) -> tuple[str, ...]:
        """Full names of the registered services."""
        return tuple(r.name for r in self._registrations)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("not started")
        return self._port

    @property
    def target(self) -> str:
        """Where a client on this machine reaches the server (``host:port``)."""
        host = self.config.host
        if host in ("0.0.0.0", "", "::", "[::]"):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def health(self) -> HealthService:
        return self._health

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> int:
        """Run the start-up hooks, bind, start serving, and return the bound port."""
        if self._server is not None:
            raise RuntimeError("already started")
        if not self._registrations:
            raise RuntimeError("no service registered: call add_service() first")
        for hook in self._on_start:
            await hook()
        try:
            if self.config.metrics_port:
                self.metrics = self.metrics or RpcMetrics()
                self._exposition = serve_metrics(
                    self.metrics.registry, self.config.host, self.config.metrics_port
                )
            server, port = self._bind()
            await server.start()
        except BaseException:
            self._close_exposition()
            await self._run_stop_hooks()
            raise
        self._server, self._port = server, port
        await self.refresh_health()
        self._watcher = asyncio.create_task(self._watch_readiness(), name=f"{self.name}-health")
        log.info(
            "%s (%s %s) serving %s on %s",
            self.name,
            self.service_role.value,
            self.service_type.value,
            ", ".join(self.services),
            self.config.address.rsplit(":", 1)[0]
            + f":{port}"
            + (f" and unix:{self.config.unix_socket}" if self.config.unix_socket else ""),
        )
        return port

    def _bind(self) -> tuple[grpc.aio.Server, int]:
        cfg = self.config
        server = grpc.aio.server(
            interceptors=(
                *([ServiceKeys(cfg.service_keys)] if cfg.service_keys else ()),
                *self._interceptors,
            ),
            options=_server_options(cfg),
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs or None,
        )
        for reg in self._registrations:
            handlers = {
                m: guard(f"/{reg.name}/{m}", h, self.metrics) for m, h in reg.handlers.items()
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(reg.name, handlers),)
            )
            server.add_registered_method_handlers(reg.name, handlers)  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection(server, [*self.services, HEALTH_SERVICE])
        credentials = server_credentials(cfg)
        addresses = [cfg.address, *([f"unix:{cfg.unix_socket}"] if cfg.unix_socket else [])]
        ports = []
        for address in addresses:
            try:
                if credentials is not None:
                    ports.append(server.add_secure_port(address, credentials))
                else:
                    ports.append(server.add_insecure_port(address))
            except RuntimeError:
                raise OSError(f"{self.name}: cannot listen on {address} (in use?)") from None
        return server, ports[0]

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving: NOT_SERVING first, then drain in-flight calls for ``grace`` seconds."""
        server = self._server
        if server is None:
            return
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        self._health.shutdown()
        if self.config.drain_delay > 0:
            await asyncio.sleep(self.config.drain_delay)
        self._health.close()
        await server.stop(self.config.grace if grace is None else grace)
        self._server = None
        if self.config.unix_socket:  # gRPC leaves the socket's file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.unix_socket)
        self._close_exposition()
        await self._run_stop_hooks()
        log.info("%s stopped", self.name)

    def _close_exposition(self) -> None:
        if self._exposition is not None:
            exposition, self._exposition = self._exposition[0], None
            exposition.shutdown()
            exposition.server_close()

    async def _run_stop_hooks(self) -> None:
        for hook in reversed(self._on_stop):
            try:
                await hook()
            except Exception:
                log.exception("%s: a shutdown hook failed", self.name)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self: Self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- health -------------------------------------------------------------------------------

    async def refresh_health(self) -> None:
        """Ask every readiness callable now and publish the result."""
        results = await asyncio.gather(*(self._is_ready(r) for r in self._registrations))
        for reg, ok in zip(self._registrations, results, strict=True):
            self._health.set(reg.name, SERVING if ok else NOT_SERVING)
        self._health.set("", SERVING if all(results) else NOT_SERVING)

    async def _is_ready(self, reg: _Registration) -> bool:
        if reg.ready is None:
            return True
        try:
            result = reg.ready()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self.config.health_timeout)
            return bool(result)
        except Exception as exc:
            log.warning("%s: readiness check of %s failed: %r", self.name, reg.name, exc)
            return False

    async def _watch_readiness(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            await self.refresh_health()
