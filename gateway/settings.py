"""The gateway's settings: ``OPEA_GATEWAY_<FIELD>`` for each field, flags override."""

from __future__ import annotations

from dataclasses import dataclass

from opea_grpc.config import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class Settings:
    """``OPEA_GATEWAY_<FIELD>`` for each field.

    A downstream target is ``host:port``, a replica list ``ipv4:h1:p1,h2:p2`` or
    ``dns:///name:port``; calls spread round-robin over the healthy replicas.
    """

    embedding: str = "127.0.0.1:50051"
    retrieval: str = "127.0.0.1:50052"
    #: Empty: the pipeline runs without a rerank step.
    rerank: str = "127.0.0.1:50053"
    chat: str = "127.0.0.1:50054"
    #: The REST (OpenAI facade) port; the gRPC face takes ``--port`` / ``OPEA_PORT`` (50050).
    rest_port: int = 8888
    #: Seconds a request may take in all, unless it asks for less (or more, up to max_timeout).
    timeout: float = 120.0
    max_timeout: float = 600.0
    #: Per-node caps within the request's deadline.
    embed_timeout: float = 10.0
    retrieve_timeout: float = 10.0
    rerank_timeout: float = 5.0
    #: Rerank is optional by default: when it fails or is slow, answers go on, marked degraded.
    rerank_optional: bool = True
    #: Retrieval defaults: collection, candidates retrieved (top_k) and passages kept (top_n).
    collection: str = "default"
    top_k: int = 10
    top_n: int = 3
    #: Largest REST request body in bytes (413 beyond).
    max_body_bytes: int = 8 * 1024 * 1024
    #: Ingestion: characters per chunk and characters shared by neighbouring chunks.
    chunk_size: int = 1000
    chunk_overlap: int = 200
    #: Pipeline cache (query embeddings, retrieval results): entries and seconds; 0 disables.
    cache_size: int = 4096
    cache_ttl: float = 300.0
    #: Empty: each gateway caches in its own memory. ``redis://host:6379/0``: replicas share
    #: one cache there (``pip install 'opea-grpc[redis]'``), and a write through any of them
    #: drops the cached searches of all.
    cache_url: str = ""
    #: What requests ask a service for in the same pass of the event loop goes to it as one
    #: call of at most this many (query embeddings as one Embed, searches as one SearchBatch,
    #: rerankings as one RerankBatch: opea_grpc.coalescing); 1: a call per request.
    coalesce: int = 32
    #: API keys (hashed, with scopes; see gateway.auth); empty: no key needed.
    api_keys_file: str = ""
    #: With API keys: /metrics needs an admin key too.
    metrics_auth: bool = False
    #: Per API key (per client address without keys): requests and model tokens a minute
    #: (token buckets; 0: no limit). Over the budget: 429 / RESOURCE_EXHAUSTED with a retry time.
    rate_rpm: int = 0
    rate_tpm: int = 0
    #: Requests in flight at once, REST and gRPC together; beyond it new ones are refused at
    #: once, 429 / RESOURCE_EXHAUSTED with a retry time (0: no limit). Probes are never refused.
    max_in_flight: int = 0
    #: Browser origins allowed to call the REST API (comma-separated; empty: CORS closed).
    cors_origins: tuple[str, ...] = ()
    #: A log line per REST request (method, path, status, milliseconds, client; with the
    #: request id and trace id in the line's context).
    access_log: bool = False

    def __post_init__(self) -> None:
        for name in ("embedding", "retrieval", "chat"):
            _check(bool(getattr(self, name)), f"OPEA_GATEWAY_{name.upper()} needs a target")
        _check(0 <= self.rest_port <= 65535, f"OPEA_GATEWAY_REST_PORT: {self.rest_port} is no port")
        _check(self.timeout > 0, "OPEA_GATEWAY_TIMEOUT must be positive")
        _check(self.max_timeout >= self.timeout, "OPEA_GATEWAY_MAX_TIMEOUT must be >= TIMEOUT")
        for name in ("embed_timeout", "retrieve_timeout", "rerank_timeout"):
            _check(getattr(self, name) > 0, f"OPEA_GATEWAY_{name.upper()} must be positive")
        _check(self.top_k >= 1, "OPEA_GATEWAY_TOP_K must be >= 1")
        _check(self.top_n >= 1, "OPEA_GATEWAY_TOP_N must be >= 1")
        _check(self.max_body_bytes >= 1024, "OPEA_GATEWAY_MAX_BODY_BYTES must be >= 1024")
        _check(self.chunk_size >= 1, "OPEA_GATEWAY_CHUNK_SIZE must be >= 1")
        _check(
            0 <= self.chunk_overlap < self.chunk_size,
            "OPEA_GATEWAY_CHUNK_OVERLAP must be >= 0 and below OPEA_GATEWAY_CHUNK_SIZE",
        )
        _check(self.cache_size >= 0, "OPEA_GATEWAY_CACHE_SIZE must be >= 0")
        _check(self.cache_ttl >= 0, "OPEA_GATEWAY_CACHE_TTL must be >= 0")
        _check(self.coalesce >= 1, "OPEA_GATEWAY_COALESCE must be >= 1")
        _check(self.rate_rpm >= 0, "OPEA_GATEWAY_RATE_RPM must be >= 0")
        _check(self.rate_tpm >= 0, "OPEA_GATEWAY_RATE_TPM must be >= 0")
        _check(self.max_in_flight >= 0, "OPEA_GATEWAY_MAX_IN_FLIGHT must be >= 0")
        _check(
            not self.cache_url or self.cache_url.startswith(("redis://", "rediss://", "unix://")),
            f"OPEA_GATEWAY_CACHE_URL must be a redis:// URL, got {self.cache_url!r}",
        )
