"""The gateway: the ChatQnA megaservice with its gRPC face and its OpenAI-compatible REST facade.

>>> service = build(ServerConfig(port=0), Settings(rest_port=0))
>>> grpc_port = await service.start()        # REST is up too: service.rest.port

``opea-grpc serve gateway`` (or ``python -m gateway``) builds it from ``OPEA_GATEWAY_*``: the gRPC
face on ``--port`` (50050), REST on ``OPEA_GATEWAY_REST_PORT`` (8888), same host. With
``OPEA_TLS_CERT``/``OPEA_TLS_KEY`` both speak TLS with that certificate (HTTPS for REST), and
``OPEA_TLS_CLIENT_AUTH`` makes both require a client certificate.
"""

from __future__ import annotations

from gateway.app import Gateway, create_app
from gateway.auth import AuthInterceptor, KeyRing, caller
from gateway.ingestion import Knowledge
from gateway.limits import Capacity, Limiter
from gateway.megaservice import ChatQnA
from gateway.mesh import Mesh
from gateway.metrics import Metrics
from gateway.rest import RestServer
from gateway.servicer import Charge, ChatQnAServicer, ModelsServicer
from gateway.settings import Settings
from opea_grpc import models
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.metrics import RpcMetrics
from opea_grpc.pb.v1 import chatqna_pb2_grpc
from opea_grpc.server import MicroService, ServiceRole, ServiceType

NAME = "gateway"
DEFAULT_PORT = 50050

__all__ = ["DEFAULT_PORT", "NAME", "Gateway", "GatewayService", "Settings", "build"]


class GatewayService(MicroService):
    """The gateway's MicroService; ``rest`` is its REST server, ``gateway`` what routes use."""

    rest: RestServer
    gateway: Gateway


def _charger(keys: KeyRing | None, limiter: Limiter | None) -> Charge | None:
    """Charges a gRPC caller's model tokens to its key's budget."""
    if limiter is None:
        return None

    def charge(metadata: object, tokens: int) -> None:
        limiter.charge(caller(keys, metadata, None), tokens)

    return charge


def build(
    server: ServerConfig, settings: Settings, client: ClientConfig | None = None
) -> GatewayService:
    """The gateway for ``settings``; nothing connects or binds until it starts."""
    mesh = Mesh(settings, client)
    pipeline = ChatQnA(settings, mesh.clients)
    metrics = Metrics(
        {"embed": pipeline.embed_cache, "retrieve": pipeline.search_cache},
        mesh.breakers,
        {
            name: coalescer
            for name, coalescer in (
                ("embed", pipeline.embed),
                ("retrieve", pipeline.search),
                ("rerank", pipeline.rerank),
            )
            if coalescer is not None
        },
    )
    pipeline.observe(metrics.record_node)
    gateway = Gateway(mesh, pipeline, Knowledge(pipeline), metrics)
    keys = KeyRing.from_file(settings.api_keys_file) if settings.api_keys_file else None
    limiter = (
        Limiter(settings.rate_rpm, settings.rate_tpm)
        if settings.rate_rpm or settings.rate_tpm
        else None
    )
    # One count of requests in flight for both faces (0: no limit, nothing counted).
    capacity = Capacity(settings.max_in_flight) if settings.max_in_flight else None
    app = create_app(
        gateway,
        keys=keys,
        metrics_closed=settings.metrics_auth,
        limiter=limiter,
        access_log=settings.access_log,
        capacity=capacity,
    )
    rest = RestServer(app, host=server.host, port=settings.rest_port, name=NAME, tls=server)

    service = GatewayService(
        NAME,
        service_type=ServiceType.GATEWAY,
        service_role=ServiceRole.MEGASERVICE,
        config=server,
        interceptors=[AuthInterceptor(keys, limiter)] if keys or limiter else (),
        metrics=RpcMetrics(metrics.registry),  # the gRPC face's calls, on the same /metrics
    )
    service.rest, service.gateway = rest, gateway
    (
        service.add_service(
            chatqna_pb2_grpc.add_ChatQnAServiceServicer_to_server,
            ChatQnAServicer(pipeline, _charger(keys, limiter), capacity),
            ready=mesh.is_ready,
        )
        .add_service(models.add_to_server, ModelsServicer(mesh))
        .on_start(mesh.start)
        .on_start(pipeline.start)
        .on_start(rest.start)
        .on_stop(rest.stop)
        .on_stop(pipeline.close)
        .on_stop(mesh.close)
    )
    return service
