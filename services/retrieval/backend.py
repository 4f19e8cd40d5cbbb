"""The retrieval backend Protocol, the values it exchanges, and the factory that picks one.

A backend stores documents in named collections and answers searches; the servicer
(:mod:`services.retrieval.servicer`) validates requests and translates protobuf to these types,
so a backend receives only well-formed input (see "Preconditions") but still owns every check
that needs its data: unknown collection, wrong dimension.

Contract every backend honours (the tests in ``tests/services/test_retrieval.py`` run against
each one):

- **Collections** are created by the first ``upsert`` into them, with the dimension of its
  vectors; ``search``/``delete`` on a collection that does not exist raise
  :func:`unknown_collection` (NOT_FOUND); a vector of another dimension raises
  :func:`wrong_dimension` (INVALID_ARGUMENT).
- **Upsert** is idempotent by id: a record with an existing id replaces text, metadata and
  vector. It returns after the write is durable (committed).
- **Search**: ``conditions`` (see :mod:`services.retrieval.filters`) restrict the candidates
  *before* ranking, so ``top_k`` results come back whenever ``top_k`` documents match.

  - ``vector`` only: dense ranking, ``score`` = cosine similarity (in [-1, 1]).
  - ``query`` only: lexical ranking (BM25 or the engine's nearest equivalent), ``score`` > 0,
    higher is better; documents sharing no term with the query are not returned.
  - both: hybrid; each list's best ``max(top_k * 4, hybrid_candidates)`` candidates are fused
    by :func:`services.retrieval.fusion.hybrid` (``fusion``: weighted z-scores by default, or
    reciprocal rank fusion ``score = sum(1 / (rrf_k + rank))`` with 1-based ranks).
  - ``score_threshold`` drops hits whose final score is below it (a cosine in dense mode, the
    fused score in hybrid mode).
  - Hits come best first; equal scores in id order. Deleted or replaced documents never appear.
- **Delete** removes the union of ``ids`` and the documents matching ``conditions`` (when there
  are any conditions; the servicer refuses a delete with neither) and returns how many existed.

Preconditions (checked by the servicer): ids non-empty and unique within one upsert; vectors
1-D float32, finite, non-zero, all of one dimension per call; ``top_k >= 1``; conditions passed
:func:`~services.retrieval.filters.check_conditions`; at least one of ``vector``/``query``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import grpc
import numpy as np
import numpy.typing as npt

from opea_grpc.config import ConfigError
from opea_grpc.errors import ServiceError
from services.retrieval.filters import JSON, Condition, Op, Scalar, check_conditions, matches

if TYPE_CHECKING:
    from services.retrieval.service import Settings

__all__ = [
    "BACKENDS",
    "JSON",
    "Backend",
    "CollectionInfo",
    "Condition",
    "Hit",
    "Op",
    "Record",
    "Scalar",
    "Vector",
    "check_conditions",
    "make_backend",
    "matches",
    "unknown_collection",
    "wrong_dimension",
]

#: A 1-D float32 embedding.
Vector = npt.NDArray[np.float32]

#: Backend names :func:`make_backend` knows.
BACKENDS = ("local", "pgvector")


@dataclass(frozen=True, slots=True)
class Record:
    """A document to store: its embedding travels with it."""

    id: str
    text: str
    metadata: Mapping[str, JSON]
    vector: Vector = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Hit:
    """A document a search found, with its score (higher is better)."""

    id: str
    text: str
    metadata: Mapping[str, JSON]
    score: float


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """A collection, its vector size and how many documents it holds."""

    name: str
    dimensions: int
    count: int


class Backend(Protocol):
    """Where documents live. Constructors do no I/O; ``start`` opens, ``close`` releases."""

    async def start(self) -> None:
        """Open the store (files, pools); load what must be in memory. Called once."""

    async def close(self) -> None:
        """Release everything; acknowledged writes are already durable. Safe to call twice."""

    async def ready(self) -> bool:
        """True while the store is open and reachable (drives gRPC health)."""

    async def search(
        self,
        collection: str,
        vector: Vector | None,
        query: str,
        top_k: int,
        conditions: Sequence[Condition],
        score_threshold: float | None,
    ) -> list[Hit]:
        """The best ``top_k`` documents, best first (see the module docstring for scoring)."""

    async def upsert(self, collection: str, records: Sequence[Record]) -> int:
        """Insert or replace ``records`` by id (creating the collection); returns how many."""

    async def delete(
        self, collection: str, ids: Sequence[str], conditions: Sequence[Condition]
    ) -> int:
        """Delete the documents with these ids and those matching ``conditions``; how many."""

    async def collections(self) -> list[CollectionInfo]:
        """Every collection, by name."""

    async def drop(self, collection: str) -> bool:
        """Delete a collection and its documents; False when there was none."""


#: How many existing collections a NOT_FOUND message lists.
_LISTED = 5


def unknown_collection(name: str, existing: Sequence[str]) -> ServiceError:
    """NOT_FOUND for ``name``, listing a few of the collections that do exist."""
    if not existing:
        hint = "there are no collections yet: upsert documents to create one"
    else:
        shown = ", ".join(repr(n) for n in sorted(existing)[:_LISTED])
        more = f" and {len(existing) - _LISTED} more" if len(existing) > _LISTED else ""
        hint = f"existing collections: {shown}{more}"
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"collection {name!r} does not exist; {hint}")


def wrong_dimension(collection: str, expected: int, got: int, what: str) -> ServiceError:
    """INVALID_ARGUMENT for a vector (``what``: "query vector", "documents[3].embedding")."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{what} has {got} dimensions but collection {collection!r} holds {expected}-dimensional "
        "vectors: embed with the collection's model, or use another collection",
    )


def make_backend(settings: Settings) -> Backend:
    """The backend ``settings.backend`` names; the constructor does no I/O."""
    match settings.backend:
        case "local":
            from services.retrieval.local import LocalBackend

            return LocalBackend(settings)
        case "pgvector":
            # Imported by name: the module needs the optional ``pgvector`` extra (asyncpg).
            try:
                module = importlib.import_module("services.retrieval.pgvector")
            except ImportError as exc:
                raise ConfigError(
                    "OPEA_RETRIEVAL_BACKEND=pgvector needs the pgvector extra: "
                    f"pip install 'opea-grpc[pgvector]' ({exc})"
                ) from None
            return cast(Backend, module.PgvectorBackend(settings))
        case other:
            raise ConfigError(
                f"OPEA_RETRIEVAL_BACKEND: unknown backend {other!r}; choose one of "
                + ", ".join(BACKENDS)
            )
