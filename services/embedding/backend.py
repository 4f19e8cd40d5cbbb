"""What an embedding backend is, and the factory that picks one from the settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from opea_grpc.config import ConfigError

if TYPE_CHECKING:
    from services.embedding.service import Settings

BACKENDS = ("minilm", "hashing", "openai")

Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model a backend serves, as ``ListModels`` describes it."""

    id: str
    owned_by: str
    #: Vector size; None while unknown (an upstream that has not answered yet).
    dimensions: int | None
    #: Longest input the model reads, in tokens (0: no fixed limit, or unknown).
    max_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Embeddings:
    """One vector per input, in input order, shape (inputs, dimensions), and the tokens read."""

    vectors: Vectors
    tokens: int


class Embedder(Protocol):
    """Turns texts into vectors."""

    @property
    def info(self) -> ModelInfo:
        """The served model (its dimensions may become known only once started)."""
        ...

    async def start(self) -> None:
        """Load the model or open the upstream client; raise when the backend cannot work."""
        ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """Whether a call would be served now (a loaded model, an upstream that answers)."""
        ...

    async def embed(self, texts: Sequence[str], *, user: str = "") -> Embeddings:
        """Vectors for ``texts`` (non-empty, each non-empty); ``user`` goes to an upstream."""
        ...


def shorten(vectors: Vectors, dimensions: int) -> Vectors:
    """The first ``dimensions`` components of each vector, scaled back to unit length.

    What OpenAI's text-embedding-3 models do for the ``dimensions`` parameter.
    """
    head = vectors[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    unit: Vectors = (head / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
    return unit


def make_backend(settings: Settings) -> Embedder:
    """The backend ``settings.backend`` names (``OPEA_EMBEDDING_BACKEND``)."""
    match settings.backend:
        case "minilm":
            from services.embedding.minilm import MiniLMEmbedder

            return MiniLMEmbedder(max_batch=settings.max_batch, max_queue=settings.max_queue)
        case "hashing":
            from services.embedding.hashing import HashingEmbedder

            return HashingEmbedder(
                dimensions=settings.dimensions or 384,
                max_batch=settings.max_batch,
                max_queue=settings.max_queue,
            )
        case "openai":
            from services.embedding.openai import UpstreamEmbedder
            from services.upstream import upstream_for

            upstream = upstream_for(settings)
            return UpstreamEmbedder(
                upstream,
                model=settings.model,
                dimensions=settings.dimensions,
                batch=settings.upstream_batch,
                concurrency=settings.upstream_concurrency,
            )
        case other:
            raise ConfigError(
                f"OPEA_EMBEDDING_BACKEND: unknown backend {other!r}; "
                f"choose one of {', '.join(BACKENDS)}"
            )
