"""What a rerank backend is, and the factory that picks one from the settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from opea_grpc.config import ConfigError

if TYPE_CHECKING:
    from services.rerank.service import Settings

BACKENDS = ("lexical", "openai")
#: The request shapes of upstream rerank servers (backend ``openai``).
APIS = ("cohere", "tei")


@dataclass(frozen=True, slots=True)
class Ranked:
    """One candidate's place: its position in the request and its relevance (higher is better)."""

    index: int
    score: float


@dataclass(frozen=True, slots=True)
class Ranking:
    """The candidates best first (at most ``top_n`` of them), and the tokens the work took.

    ``tokens`` is 0 when the backend cannot tell (an upstream that reports no usage).
    """

    results: tuple[Ranked, ...]
    tokens: int = 0


class Reranker(Protocol):
    """Orders passages by relevance to a query."""

    @property
    def model(self) -> str:
        """The model id this backend answers with."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """Whether a call would be served now (an upstream that answers, a loaded model)."""
        ...

    async def rerank(self, query: str, texts: Sequence[str], top_n: int | None) -> Ranking:
        """Rank ``texts`` (non-empty, each non-empty) for ``query``; keep the best ``top_n``."""
        ...


def make_backend(settings: Settings) -> Reranker:
    """The backend ``settings.backend`` names (``OPEA_RERANK_BACKEND``)."""
    match settings.backend:
        case "lexical":
            from services.rerank.lexical import LexicalReranker

            return LexicalReranker(
                k1=settings.k1,
                b=settings.b,
                rrf_k=settings.rrf_k,
                incoming_weight=settings.incoming_weight,
                offload_chars=settings.offload_chars,
            )
        case "openai":
            from services.rerank.openai import UpstreamReranker
            from services.upstream import upstream_for

            upstream = upstream_for(settings)
            return UpstreamReranker(upstream, model=settings.model, api=settings.api)
        case other:
            raise ConfigError(
                f"OPEA_RERANK_BACKEND: unknown backend {other!r}; choose one of "
                + ", ".join(BACKENDS)
            )
