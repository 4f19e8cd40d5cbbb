"""Backend ``openai``: any OpenAI-compatible ``POST /v1/embeddings`` server.

Text-embeddings-inference, vLLM, Ollama and OpenAI itself answer ``{model, input: [...],
encoding_format: "float"}`` with ``{"data": [{"index", "embedding"}], "usage":
{"prompt_tokens"}}``. A request with more texts than the upstream takes at once (``batch``) is
split into several upstream calls, run concurrently up to ``concurrency`` at a time across the
whole service. The vector size is probed at start when the upstream answers, else learnt from
the first reply. Failures map as :mod:`services.upstream` maps them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from opea_grpc import deadline
from opea_grpc.errors import ServiceError
from services.embedding.backend import Embeddings, ModelInfo, Vectors
from services.upstream import Upstream

log = logging.getLogger(__name__)

PATH = "/v1/embeddings"
#: Seconds the start-up probe of the vector size may take.
PROBE_SECONDS = 5.0


def _bad_reply(why: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, f"upstream {PATH} sent a bad reply: {why}")


def parse_reply(body: Any, count: int) -> tuple[Vectors, int]:
    """The vectors in input order and the prompt tokens of an upstream reply, checked."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != count:
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise _bad_reply(f"expected {count} embeddings under 'data', got {got}")
    rows: list[Any] = [None] * count
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            raise _bad_reply(f"embedding index {index!r} is not within 0..{count - 1}")
        rows[index] = item.get("embedding")
    if any(r is None for r in rows):
        raise _bad_reply("an index appears twice")
    try:
        vectors = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise _bad_reply("embeddings are not equal-length lists of numbers") from None
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise _bad_reply("embeddings are not equal-length lists of numbers")
    usage = body.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return vectors, tokens if isinstance(tokens, int) and tokens >= 0 else 0


class UpstreamEmbedder:
    """Embeds through an upstream server; ready while it answers."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        model: str,
        dimensions: int | None = None,
        batch: int = 32,
        concurrency: int = 4,
    ) -> None:
        if batch < 1 or concurrency < 1:
            raise ValueError("batch and concurrency must be >= 1")
        self._upstream = upstream
        self._model = model
        self._dimensions = dimensions
        self._batch = batch
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self._model, "upstream", self._dimensions, 0)

    async def start(self) -> None:
        await self._upstream.start()
        if self._dimensions is None and await self._upstream.reachable():
            try:
                with deadline.scope(PROBE_SECONDS):
                    await self.embed(["dimension probe"])
            except ServiceError as exc:  # not fatal: the first reply will tell
                log.warning("embedding: probing %s for its vector size failed: %s", PATH, exc)

    async def close(self) -> None:
        await self._upstream.close()

    async def ready(self) -> bool:
        return await self._upstream.reachable()

    async def embed(self, texts: Sequence[str], *, user: str = "") -> Embeddings:
        if not texts:
            return Embeddings(np.zeros((0, self._dimensions or 0), dtype=np.float32), 0)
        parts = [texts[i : i + self._batch] for i in range(0, len(texts), self._batch)]
        tasks = [asyncio.ensure_future(self._call(part, user)) for part in parts]
        try:
            replies = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        vectors = replies[0][0] if len(replies) == 1 else np.concatenate([v for v, _ in replies])
        return Embeddings(vectors, sum(t for _, t in replies))

    async def _call(self, texts: Sequence[str], user: str) -> tuple[Vectors, int]:
        payload: dict[str, Any] = {
            "model": self._model,
            "input": list(texts),
            "encoding_format": "float",
        }
        if user:
            payload["user"] = user
        async with self._slots:
            body = await self._upstream.post(PATH, payload)
        vectors, tokens = parse_reply(body, len(texts))
        size = vectors.shape[1]
        if self._dimensions is None:
            self._dimensions = size
            log.info("embedding: upstream model %s has %d dimensions", self._model, size)
        elif size != self._dimensions:
            raise _bad_reply(
                f"{size}-dimensional vectors where {self._dimensions} were expected "
                "(OPEA_EMBEDDING_DIMENSIONS, or the size the upstream first answered with)"
            )
        return vectors, tokens
