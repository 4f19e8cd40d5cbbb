"""The minilm backend gives the vectors sentence-transformers gives, through the whole service.

``minilm_reference.json`` holds 13 varied sentences (short, non-ASCII, CJK, Cyrillic, emoji,
punctuation only, padded with spaces, code, a URL, and one of about 400 word pieces that gets
truncated to 256) with the all-MiniLM-L6-v2 vectors that sentence-transformers 6.2.0 on torch
2.13.0 (CPU) computed, rounded to 6 decimals. It was made by
``tests/services/make_minilm_reference.py``, run with a throwaway virtualenv holding torch,
sentence-transformers and the model package (the script's docstring has the commands), loading
the model from the package's directory with the Hugging Face hub offline. sentence-transformers
and torch are not dependencies of this project; this test needs neither.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from opea_grpc.channel import connect
from opea_grpc.client import EmbeddingClient
from opea_grpc.config import ServerConfig
from opea_grpc.pb.v1 import embedding_pb2
from opea_grpc.testing import wait_for_serving
from services.embedding.bert import gelu
from services.embedding.service import Settings, build

REFERENCE = Path(__file__).with_name("minilm_reference.json")
THRESHOLD = 0.999


def load_reference() -> tuple[list[str], npt.NDArray[np.float64]]:
    doc = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert doc["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    texts = [s["text"] for s in doc["sentences"]]
    return texts, np.array([s["embedding"] for s in doc["sentences"]], dtype=np.float64)


def cosines(got: npt.NDArray[np.float64], want: npt.NDArray[np.float64]) -> list[float]:
    dots = (got * want).sum(axis=1)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    return [float(c) for c in dots / norms]


async def test_minilm_matches_sentence_transformers() -> None:
    texts, want = load_reference()
    assert len(texts) >= 12
    assert want.shape == (len(texts), 384)
    service = build(ServerConfig(host="127.0.0.1", port=0), Settings(backend="minilm"))
    await service.start()
    channel = connect(service.target, [EmbeddingClient.SERVICE])
    try:
        await wait_for_serving(channel, EmbeddingClient.SERVICE)
        client = EmbeddingClient(channel, timeout=60)
        batch = await client.embed(embedding_pb2.EmbedRequest(input=texts))
        singles = [await client.embed(embedding_pb2.EmbedRequest(input=[t])) for t in texts]
    finally:
        await channel.close(None)
        await service.stop(0)
    for got in (
        np.array([d.embedding for d in batch.data], dtype=np.float64),
        np.array([s.data[0].embedding for s in singles], dtype=np.float64),
    ):
        scores = cosines(got, want)
        worst = min(range(len(texts)), key=lambda i: scores[i])
        assert scores[worst] >= THRESHOLD, f"cosine {scores[worst]:.6f} for {texts[worst]!r}"
    long_tokens = singles[-1].usage.prompt_tokens
    assert long_tokens == 256  # the long sentence was cut where sentence-transformers cuts it


def test_gelu_is_the_erf_form_bert_uses() -> None:
    # Exact GELU, x * Phi(x); the tanh approximation is off by up to 5e-4 and fails this.
    x = np.linspace(-12, 12, 24001, dtype=np.float32)
    want = np.array([v / 2 * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()])
    assert float(np.abs(gelu(x.copy()) - want).max()) < 1e-6
