"""Backend ``hashing``: signed feature hashing of words and word pairs, no model.

Each lower-cased word (``\\w+``) and each pair of adjacent words adds +1 or -1 to one of
``dimensions`` buckets, both chosen by a keyed hash of the feature (BLAKE2b, the same on every
machine and run); the sum is scaled to unit length. Texts that share words get similar vectors;
there is no notion of meaning beyond that. It is the floor to compare a model against, and the
fast backend for tests. A text with no word characters hashes its characters instead.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from collections.abc import Sequence

import numpy as np

from services.embedding.backend import Embeddings, ModelInfo
from services.embedding.batcher import Floats, Ints, MicroBatcher

_WORD = re.compile(r"\w+")
_KEY = b"opea-grpc/hashing/v1"


@functools.lru_cache(maxsize=1 << 16)
def _feature(feature: str) -> int:
    """A stable 64-bit hash of ``feature``."""
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, key=_KEY).digest()
    return int.from_bytes(digest, "little")


def features(text: str) -> tuple[list[str], int]:
    """The features of ``text`` and its token count (words, or characters if it has none)."""
    words = _WORD.findall(text.lower())
    if not words:
        chars = [c for c in text if not c.isspace()] or [" "]
        return chars, len(chars)
    pairs = [f"{a} {b}" for a, b in itertools.pairwise(words)]
    return words + pairs, len(words)


def hash_texts(texts: Sequence[str], dimensions: int) -> tuple[Floats, Ints]:
    """Unit vectors (len(texts), dimensions) and token counts."""
    out = np.zeros((len(texts), dimensions), dtype=np.float32)
    counts = np.zeros(len(texts), dtype=np.int64)
    for row, text in enumerate(texts):
        feats, counts[row] = features(text)
        hashes = np.fromiter((_feature(f) for f in feats), dtype=np.uint64, count=len(feats))
        buckets = (hashes % np.uint64(dimensions)).astype(np.intp)
        signs = np.where(hashes >> np.uint64(63), np.float32(1), np.float32(-1))
        vector = np.bincount(buckets, weights=signs, minlength=dimensions)
        norm = float(np.linalg.norm(vector))
        if norm == 0:  # every feature cancelled out: fall back to the first one alone
            vector[buckets[0]] = 1.0
            norm = 1.0
        out[row] = vector / norm
    return out, counts


class HashingEmbedder:
    """Feature hashing into ``dimensions`` buckets, off the event loop, micro-batched."""

    def __init__(self, *, dimensions: int = 384, max_batch: int = 32, max_queue: int = 16384):
        if dimensions < 1:
            raise ValueError("dimensions must be >= 1")
        self.dimensions = dimensions
        self._batcher = MicroBatcher(
            functools.partial(hash_texts, dimensions=dimensions),
            max_batch=max_batch,
            max_queue=max_queue,
            name="hashing",
        )

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(f"hashing-{self.dimensions}", "opea-grpc", self.dimensions, 0)

    @property
    def passes(self) -> int:
        return self._batcher.passes

    async def start(self) -> None:
        await self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()

    async def ready(self) -> bool:
        return self._batcher.running

    async def embed(self, texts: Sequence[str], *, user: str = "") -> Embeddings:
        vectors, tokens = await self._batcher.submit(texts)
        return Embeddings(vectors, int(tokens.sum()))
