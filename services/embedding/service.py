"""The embedding service: its settings and how it is assembled.

>>> service = build(ServerConfig(port=0), Settings())        # minilm, offline
>>> port = await service.start()                              # loads the model, then binds

``opea-grpc serve embedding`` (or ``python -m services.embedding``) builds it from
``OPEA_EMBEDDING_*``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opea_grpc import models
from opea_grpc.config import ConfigError, ServerConfig
from opea_grpc.pb.v1 import common_pb2, embedding_pb2_grpc
from opea_grpc.server import MicroService, ServiceType
from services.embedding.backend import make_backend
from services.embedding.minilm import DIMENSIONS as MINILM_DIMENSIONS
from services.embedding.minilm import MODEL_ID as MINILM_ID
from services.embedding.servicer import EmbeddingServicer

NAME = "embedding"
DEFAULT_PORT = 50051


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class Settings:
    """``OPEA_EMBEDDING_<FIELD>`` for each field."""

    #: ``minilm`` (all-MiniLM-L6-v2 on numpy, offline), ``hashing`` (no model) or ``openai``.
    backend: str = "minilm"
    #: openai: the upstream's model id (required); minilm and hashing serve their own.
    model: str = ""
    #: hashing: buckets per vector (default 384); openai: the upstream's vector size, when
    #: known in advance (else probed); minilm: 384 or unset.
    dimensions: int | None = None
    #: Most texts one request may carry.
    max_inputs: int = 2048
    #: Longest text, in characters (minilm reads the first 256 word pieces of it).
    max_input_chars: int = 100_000
    #: minilm, hashing: most texts per forward pass (concurrent calls are coalesced up to it).
    #: Larger passes gain little throughput; a call arriving during a pass waits for it.
    max_batch: int = 32
    #: minilm, hashing: most texts waiting for a pass; beyond, calls get RESOURCE_EXHAUSTED.
    max_queue: int = 16384
    #: openai: the upstream server's root URL (without /v1), e.g. http://tei:80.
    base_url: str = ""
    api_key: str = field(default="", repr=False)
    #: openai: seconds an upstream call may take (shortened to the caller's deadline).
    timeout: float = 60.0
    #: openai: extra attempts on 429/503 and connection failures, first backoff in seconds.
    max_retries: int = 3
    backoff: float = 0.25
    #: openai: most texts per upstream request (TEI's default limit is 32); larger requests
    #: are split.
    upstream_batch: int = 32
    #: openai: most upstream requests in flight at once, for the whole service.
    upstream_concurrency: int = 4

    def __post_init__(self) -> None:
        _check(self.max_inputs >= 1, "OPEA_EMBEDDING_MAX_INPUTS must be >= 1")
        _check(self.max_input_chars >= 1, "OPEA_EMBEDDING_MAX_INPUT_CHARS must be >= 1")
        _check(self.max_batch >= 1, "OPEA_EMBEDDING_MAX_BATCH must be >= 1")
        _check(
            self.max_queue >= self.max_inputs,
            "OPEA_EMBEDDING_MAX_QUEUE must be >= OPEA_EMBEDDING_MAX_INPUTS, "
            "so that a request of the largest size can be queued",
        )
        _check(
            self.dimensions is None or self.dimensions >= 1,
            "OPEA_EMBEDDING_DIMENSIONS must be >= 1 (or unset)",
        )
        _check(self.timeout > 0, "OPEA_EMBEDDING_TIMEOUT must be positive")
        _check(self.max_retries >= 0, "OPEA_EMBEDDING_MAX_RETRIES must be >= 0")
        _check(self.backoff > 0, "OPEA_EMBEDDING_BACKOFF must be positive")
        _check(self.upstream_batch >= 1, "OPEA_EMBEDDING_UPSTREAM_BATCH must be >= 1")
        _check(self.upstream_concurrency >= 1, "OPEA_EMBEDDING_UPSTREAM_CONCURRENCY must be >= 1")
        if self.backend == "minilm":
            _check(
                self.model in ("", MINILM_ID),
                f"OPEA_EMBEDDING_MODEL: backend minilm serves {MINILM_ID}; "
                f"leave it unset, got {self.model!r}",
            )
            _check(
                self.dimensions in (None, MINILM_DIMENSIONS),
                f"OPEA_EMBEDDING_DIMENSIONS: minilm vectors have {MINILM_DIMENSIONS} dimensions; "
                "leave it unset (a request may ask for fewer)",
            )
        if self.backend == "hashing":
            _check(
                self.model in ("", f"hashing-{self.dimensions or 384}"),
                "OPEA_EMBEDDING_MODEL names the upstream model of backend openai; backend "
                f"hashing serves hashing-<dimensions>, got {self.model!r}",
            )
        if self.backend == "openai":
            _check(
                self.base_url.startswith(("http://", "https://")),
                "OPEA_EMBEDDING_BASE_URL must be the upstream's http:// or https:// URL "
                f"with backend openai, got {self.base_url!r}",
            )
            _check(
                not self.base_url.rstrip("/").endswith("/v1"),
                "OPEA_EMBEDDING_BASE_URL is the server's root: drop the trailing /v1 "
                f"(the service calls <base_url>/v1/embeddings), got {self.base_url!r}",
            )
            _check(
                bool(self.model),
                "OPEA_EMBEDDING_MODEL is required with backend openai: the upstream's model id",
            )


def build(server: ServerConfig, settings: Settings) -> MicroService:
    """The embedding MicroService for ``settings``; nothing is loaded until it starts."""
    backend = make_backend(settings)
    created = int(time.time())

    def listed() -> list[common_pb2.Model]:
        info = backend.info
        return [
            common_pb2.Model(
                id=info.id,
                owned_by=info.owned_by,
                created=created,
                kind=common_pb2.MODEL_KIND_EMBEDDING,
                dimensions=info.dimensions or 0,
                max_input_tokens=info.max_input_tokens,
            )
        ]

    servicer = EmbeddingServicer(
        backend, max_inputs=settings.max_inputs, max_input_chars=settings.max_input_chars
    )
    return (
        MicroService(NAME, service_type=ServiceType.EMBEDDING, config=server)
        .add_service(
            embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
            servicer,
            ready=backend.ready,
        )
        .add_service(models.add_to_server, models.ModelCatalog(listed))
        .on_start(backend.start)
        .on_stop(backend.close)
    )
