"""``openai``: an upstream rerank server, in either of the two shapes in use.

``api="cohere"``: ``POST {base}/v1/rerank`` with ``{model, query, documents, top_n}``, answered
with ``{"results": [{"index", "relevance_score"}], "usage": {"total_tokens"}}`` (vLLM, Jina,
Cohere). ``api="tei"``: ``POST {base}/rerank`` with ``{query, texts}``, answered with
``[{"index", "score"}]`` (Hugging Face text-embeddings-inference); TEI has no ``top_n``, so the
cut is made here. Failures map as :mod:`services.upstream` maps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from opea_grpc.errors import ServiceError
from services.rerank.backend import APIS, Ranked, Ranking
from services.upstream import Upstream


def _bad_reply(path: str, why: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, f"upstream {path} sent a bad reply: {why}")


def parse_results(body: Any, *, path: str, key: str, score: str, count: int) -> list[Ranked]:
    """``[{"index": i, score: s}, ...]`` (under ``key`` when given), checked, best first."""
    items = body.get(key) if key and isinstance(body, dict) else body
    if not isinstance(items, list):
        raise _bad_reply(path, f"expected a list of results, got {type(items).__name__}")
    ranked = []
    for item in items:
        if not isinstance(item, dict):
            raise _bad_reply(path, f"a result is {type(item).__name__}, not an object")
        index, value = item.get("index"), item.get(score)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            raise _bad_reply(path, f"result index {index!r} is not within 0..{count - 1}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _bad_reply(path, f"result {index} has no numeric {score!r}")
        ranked.append(Ranked(index, float(value)))
    ranked.sort(key=lambda r: -r.score)
    return ranked


def _usage(body: Any) -> int:
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and tokens >= 0 else 0


class UpstreamReranker:
    """Ranks through an upstream server; ready while it answers."""

    def __init__(self, upstream: Upstream, *, model: str, api: str = "cohere") -> None:
        if api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
        self._upstream = upstream
        self._model = model
        self._api = api

    @property
    def model(self) -> str:
        return self._model

    async def start(self) -> None:
        await self._upstream.start()

    async def close(self) -> None:
        await self._upstream.close()

    async def ready(self) -> bool:
        return await self._upstream.reachable("/v1/models" if self._api == "cohere" else "/health")

    async def rerank(self, query: str, texts: Sequence[str], top_n: int | None) -> Ranking:
        if self._api == "tei":
            path = "/rerank"
            body = await self._upstream.post(path, {"query": query, "texts": list(texts)})
            ranked = parse_results(body, path=path, key="", score="score", count=len(texts))
        else:
            path = "/v1/rerank"
            payload: dict[str, Any] = {
                "model": self._model,
                "query": query,
                "documents": list(texts),
            }
            if top_n is not None:
                payload["top_n"] = top_n
            body = await self._upstream.post(path, payload)
            ranked = parse_results(
                body, path=path, key="results", score="relevance_score", count=len(texts)
            )
        if top_n is not None:
            ranked = ranked[:top_n]
        return Ranking(results=tuple(ranked), tokens=_usage(body))
