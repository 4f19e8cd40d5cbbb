"""The rerank service: its settings and how it is assembled.

>>> service = build(ServerConfig(port=0), Settings())        # lexical, offline
>>> port = await service.start()

``opea-grpc serve rerank`` (or ``python -m services.rerank``) builds it from ``OPEA_RERANK_*``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opea_grpc import models
from opea_grpc.config import ConfigError, ServerConfig
from opea_grpc.pb.v1 import common_pb2, rerank_pb2_grpc
from opea_grpc.server import MicroService, ServiceType
from services.rerank.backend import APIS, make_backend
from services.rerank.servicer import RerankServicer

NAME = "rerank"
DEFAULT_PORT = 50053


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class Settings:
    """``OPEA_RERANK_<FIELD>`` for each field."""

    #: ``lexical`` (BM25 + rank fusion, offline) or ``openai`` (an upstream rerank server).
    backend: str = "lexical"
    #: openai: the upstream's model id (required); lexical answers as ``bm25-rrf``.
    model: str = ""
    #: Most candidates one request may carry.
    max_documents: int = 1000
    #: lexical: BM25 term-frequency saturation and length normalisation.
    k1: float = 1.2
    b: float = 0.75
    #: lexical: the k of reciprocal rank fusion (larger flattens the rank differences).
    rrf_k: int = 60
    #: lexical: how many times the incoming order outweighs the BM25 order (1 = plain RRF).
    incoming_weight: float = 3.0
    #: lexical: requests whose candidates exceed this many characters are scored off the loop.
    offload_chars: int = 32768
    #: openai: the upstream's base URL, e.g. http://tei:80 or http://vllm:8000.
    base_url: str = ""
    #: openai: ``cohere`` (POST /v1/rerank: vLLM, Jina, Cohere) or ``tei`` (POST /rerank).
    api: str = "cohere"
    api_key: str = field(default="", repr=False)
    #: openai: seconds a call may take (shortened to the caller's deadline).
    timeout: float = 30.0
    #: openai: extra attempts on 429/503 and connection failures, first backoff in seconds.
    max_retries: int = 3
    backoff: float = 0.25

    def __post_init__(self) -> None:
        _check(self.max_documents >= 1, "OPEA_RERANK_MAX_DOCUMENTS must be >= 1")
        _check(self.k1 >= 0, "OPEA_RERANK_K1 must be >= 0")
        _check(0 <= self.b <= 1, "OPEA_RERANK_B must be within 0..1")
        _check(self.rrf_k >= 1, "OPEA_RERANK_RRF_K must be >= 1")
        _check(self.incoming_weight >= 0, "OPEA_RERANK_INCOMING_WEIGHT must be >= 0")
        _check(self.offload_chars >= 0, "OPEA_RERANK_OFFLOAD_CHARS must be >= 0")
        _check(self.api in APIS, f"OPEA_RERANK_API must be one of {', '.join(APIS)}")
        _check(self.timeout > 0, "OPEA_RERANK_TIMEOUT must be positive")
        _check(self.max_retries >= 0, "OPEA_RERANK_MAX_RETRIES must be >= 0")
        _check(self.backoff > 0, "OPEA_RERANK_BACKOFF must be positive")
        if self.backend == "lexical":
            _check(
                self.model in ("", "bm25-rrf"),
                "OPEA_RERANK_MODEL names the upstream model of backend openai; "
                f"backend lexical serves bm25-rrf, got {self.model!r}",
            )
        if self.backend == "openai":
            _check(
                self.base_url.startswith(("http://", "https://")),
                "OPEA_RERANK_BASE_URL must be the upstream's http:// or https:// URL "
                f"with backend openai, got {self.base_url!r}",
            )
            _check(
                bool(self.model),
                "OPEA_RERANK_MODEL is required with backend openai: the upstream's model id",
            )


def build(server: ServerConfig, settings: Settings) -> MicroService:
    """The rerank MicroService for ``settings``; nothing is opened until it starts."""
    backend = make_backend(settings)
    created = int(time.time())
    owner = "opea-grpc" if settings.backend == "lexical" else "upstream"

    def listed() -> list[common_pb2.Model]:
        kind = common_pb2.MODEL_KIND_RERANK
        return [common_pb2.Model(id=backend.model, owned_by=owner, created=created, kind=kind)]

    return (
        MicroService(NAME, service_type=ServiceType.RERANK, config=server)
        .add_service(
            rerank_pb2_grpc.add_RerankServiceServicer_to_server,
            RerankServicer(backend, max_documents=settings.max_documents),
            ready=backend.ready,
        )
        .add_service(models.add_to_server, models.ModelCatalog(listed))
        .on_start(backend.start)
        .on_stop(backend.close)
    )
