"""The retrieval microservice: settings and ``build``.

>>> ms = build(ServerConfig(port=0), Settings(data_dir="/tmp/index"))
>>> port = await ms.start()
"""

from __future__ import annotations

from dataclasses import dataclass

from opea_grpc import models
from opea_grpc.config import ConfigError, ServerConfig
from opea_grpc.pb.v1 import retrieval_pb2_grpc
from opea_grpc.server import MicroService, ServiceType
from services.retrieval.backend import BACKENDS, make_backend
from services.retrieval.fusion import METHODS
from services.retrieval.servicer import RetrievalServicer

DEFAULT_PORT = 50052


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class Settings:
    """Retrieval settings; each field ``foo`` is read from ``OPEA_RETRIEVAL_FOO``."""

    #: ``local`` (embedded, on-disk) or ``pgvector`` (PostgreSQL).
    backend: str = "local"
    #: Collection used when a request names none.
    default_collection: str = "default"
    #: Results when a search asks for ``top_k = 0``; and the largest ``top_k`` allowed.
    default_top_k: int = 10
    max_top_k: int = 1000
    #: Most documents in one Upsert.
    max_batch: int = 1024
    #: Hybrid search fuses each list's best ``max(4 * top_k, hybrid_candidates)`` ...
    hybrid_candidates: int = 50
    #: ... by ``zscore`` (weighted standardised scores) or ``rrf`` (reciprocal rank fusion).
    fusion: str = "zscore"
    #: zscore: the dense list's weight; the lexical list gets the rest.
    dense_weight: float = 0.5
    #: rrf: the constant k of ``score = sum(1 / (rrf_k + rank))``.
    rrf_k: int = 60
    # -- local ---------------------------------------------------------------------------------
    #: Directory of the local index (created if missing).
    data_dir: str = "./data/retrieval"
    #: A collection switches from exact search to HNSW (usearch) past this many documents.
    ann_threshold: int = 20000
    #: HNSW parameters: graph degree, construction and search breadth.
    ann_connectivity: int = 16
    ann_expansion_add: int = 64
    ann_expansion_search: int = 64
    # -- pgvector ------------------------------------------------------------------------------
    #: PostgreSQL connection string (``postgresql://user:pass@host:5432/db``).
    dsn: str = ""
    #: Connections in the pool.
    pool_size: int = 4

    def __post_init__(self) -> None:
        _check(
            self.backend in BACKENDS,
            f"OPEA_RETRIEVAL_BACKEND: unknown backend {self.backend!r}; choose one of "
            + ", ".join(BACKENDS),
        )
        _check(bool(self.default_collection), "OPEA_RETRIEVAL_DEFAULT_COLLECTION must be set")
        _check(self.max_top_k >= 1, "OPEA_RETRIEVAL_MAX_TOP_K must be >= 1")
        _check(
            1 <= self.default_top_k <= self.max_top_k,
            "OPEA_RETRIEVAL_DEFAULT_TOP_K must be 1..OPEA_RETRIEVAL_MAX_TOP_K",
        )
        _check(self.max_batch >= 1, "OPEA_RETRIEVAL_MAX_BATCH must be >= 1")
        _check(self.hybrid_candidates >= 1, "OPEA_RETRIEVAL_HYBRID_CANDIDATES must be >= 1")
        _check(self.rrf_k >= 1, "OPEA_RETRIEVAL_RRF_K must be >= 1")
        _check(
            self.fusion in METHODS,
            f"OPEA_RETRIEVAL_FUSION must be one of {', '.join(METHODS)}, got {self.fusion!r}",
        )
        _check(0 <= self.dense_weight <= 1, "OPEA_RETRIEVAL_DENSE_WEIGHT must be within 0..1")
        _check(bool(self.data_dir), "OPEA_RETRIEVAL_DATA_DIR must be set")
        _check(self.ann_threshold >= 0, "OPEA_RETRIEVAL_ANN_THRESHOLD must be >= 0")
        _check(self.ann_connectivity >= 2, "OPEA_RETRIEVAL_ANN_CONNECTIVITY must be >= 2")
        _check(self.ann_expansion_add >= 1, "OPEA_RETRIEVAL_ANN_EXPANSION_ADD must be >= 1")
        _check(self.ann_expansion_search >= 1, "OPEA_RETRIEVAL_ANN_EXPANSION_SEARCH must be >= 1")
        _check(
            self.backend != "pgvector" or bool(self.dsn),
            "OPEA_RETRIEVAL_DSN must be set for the pgvector backend "
            "(postgresql://user:password@host:5432/database)",
        )
        _check(self.pool_size >= 1, "OPEA_RETRIEVAL_POOL_SIZE must be >= 1")


def build(server: ServerConfig, settings: Settings) -> MicroService:
    """The retrieval MicroService over the backend ``settings.backend`` names."""
    backend = make_backend(settings)
    servicer = RetrievalServicer(backend, settings)
    return (
        MicroService("retrieval", service_type=ServiceType.RETRIEVER, config=server)
        .add_service(
            retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server,
            servicer,
            ready=backend.ready,
        )
        .add_service(models.add_to_server, models.ModelCatalog(list))
        .on_start(backend.start)
        .on_stop(backend.close)
    )
