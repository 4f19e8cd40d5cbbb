"""The embedding service's settings: read from ``OPEA_EMBEDDING_*``, validated, naming the
variable to fix."""

from __future__ import annotations

import pytest

from opea_grpc.config import ConfigError, load
from services.embedding.backend import make_backend
from services.embedding.service import Settings


def test_settings_come_from_opea_embedding_variables() -> None:
    env = {
        "OPEA_EMBEDDING_BACKEND": "openai",
        "OPEA_EMBEDDING_BASE_URL": "http://tei:80",
        "OPEA_EMBEDDING_MODEL": "BAAI/bge-small-en-v1.5",
        "OPEA_EMBEDDING_API_KEY": "secret",
        "OPEA_EMBEDDING_DIMENSIONS": "384",
        "OPEA_EMBEDDING_UPSTREAM_BATCH": "16",
    }
    settings = load(Settings, env, prefix="OPEA_EMBEDDING_")
    assert (settings.backend, settings.model, settings.dimensions) == (
        "openai",
        "BAAI/bge-small-en-v1.5",
        384,
    )
    assert settings.upstream_batch == 16
    assert "secret" not in repr(settings)
    assert load(Settings, {}, prefix="OPEA_EMBEDDING_").backend == "minilm"


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"backend": "bert"}, "choose one of minilm, hashing, openai"),
        ({"backend": "openai", "model": "m"}, "OPEA_EMBEDDING_BASE_URL must be"),
        ({"backend": "openai", "model": "m", "base_url": "http://x/v1"}, "drop the trailing /v1"),
        ({"backend": "openai", "base_url": "http://x"}, "OPEA_EMBEDDING_MODEL is required"),
        ({"dimensions": 768}, "minilm vectors have 384 dimensions"),
        ({"model": "bge"}, "backend minilm serves sentence-transformers/all-MiniLM-L6-v2"),
        ({"backend": "hashing", "dimensions": 0}, "OPEA_EMBEDDING_DIMENSIONS must be >= 1"),
        ({"max_inputs": 100, "max_queue": 50}, "OPEA_EMBEDDING_MAX_QUEUE must be >="),
        ({"max_batch": 0}, "OPEA_EMBEDDING_MAX_BATCH"),
    ],
)
def test_bad_settings_name_the_variable(settings: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        make_backend(Settings(**settings))  # type: ignore[arg-type]
