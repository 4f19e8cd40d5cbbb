"""Trivial backends served as real microservices, so a benchmark measures the mesh, not models.

Each function builds the service's real servicer (validation, translation, health, reflection,
``opea.v1.ModelService``) over a backend that does no work: the CPU a pipeline request costs
with these is what the framework and the gateway spend around the models.

    python -m opea_grpc serve bench.trivial:embedding --port 0   # one fixed 768-float vector
    python -m opea_grpc serve bench.trivial:retrieval --port 0   # three fixed documents
    python -m opea_grpc serve bench.trivial:rerank --port 0      # the first candidate only
    python -m opea_grpc serve bench.trivial:chat --port 0        # a fixed 32-token answer

(from the repository's root, which must be importable: ``bench`` is not an installed package).
The chat stream sends one message per token, the last token's carrying ``finish_reason`` STOP,
then the usage chunk, as ``chat.proto`` promises.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence

import numpy as np

from opea_grpc import models
from opea_grpc.config import ServerConfig
from opea_grpc.pb.v1 import (
    chat_pb2_grpc,
    common_pb2,
    embedding_pb2_grpc,
    rerank_pb2_grpc,
    retrieval_pb2_grpc,
)
from opea_grpc.server import MicroService, ServiceType
from services.chat.backend import Completion, Delta, Finish, Prompt, TokenUsage
from services.chat.servicer import ChatServicer
from services.embedding.backend import Embeddings, ModelInfo
from services.embedding.servicer import EmbeddingServicer
from services.rerank.backend import Ranked, Ranking
from services.rerank.servicer import RerankServicer
from services.retrieval.backend import CollectionInfo, Condition, Hit, Record, Vector
from services.retrieval.service import Settings as RetrievalSettings
from services.retrieval.servicer import RetrievalServicer

DIMENSIONS = 768
EMBEDDING_MODEL = "trivial-embedding"
RERANK_MODEL = "trivial-rerank"
CHAT_MODEL = "trivial-chat"
OWNER = "opea-grpc-bench"
COLLECTION = "default"

_SENTENCE = (
    "This fixed answer comes from the trivial chat backend of the benchmark, which spends no "
    "time on a model, so every millisecond measured belongs to the mesh and the gateway "
    "around it."
)
_WORDS = _SENTENCE.split(" ")
#: The answer, one token per word (each but the last with its trailing space): 32 tokens.
ANSWER_TOKENS: tuple[str, ...] = (*(w + " " for w in _WORDS[:-1]), _WORDS[-1])
ANSWER = "".join(ANSWER_TOKENS)

#: What every search finds, best first.
HITS: tuple[Hit, ...] = (
    Hit("doc-1", "gRPC carries typed protobuf messages over HTTP/2.", {"source": "a.md"}, 0.9),
    Hit("doc-2", "A megaservice composes microservices into a pipeline.", {"source": "b.md"}, 0.8),
    Hit("doc-3", "Health checks tell a balancer where to send calls.", {"source": "c.md"}, 0.7),
)

_CREATED = int(time.time())


def _tokens(text: str) -> int:
    return len(text.split())


def _catalog(
    model_id: str, kind: common_pb2.ModelKind.ValueType, **extra: int
) -> models.ModelCatalog:
    listed = [common_pb2.Model(id=model_id, owned_by=OWNER, created=_CREATED, kind=kind, **extra)]
    return models.ModelCatalog(lambda: listed)


# -- embedding ---------------------------------------------------------------------------------


class FixedEmbedder:
    """Every text embeds to the same unit vector (``services.embedding.backend.Embedder``)."""

    def __init__(self, dimensions: int = DIMENSIONS) -> None:
        vector = np.ones(dimensions, dtype=np.float32)
        self._vector = vector / np.linalg.norm(vector)
        self._info = ModelInfo(EMBEDDING_MODEL, OWNER, dimensions, 512)

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def embed(self, texts: Sequence[str], *, user: str = "") -> Embeddings:
        vectors = np.broadcast_to(self._vector, (len(texts), self._vector.shape[0]))
        return Embeddings(vectors=vectors, tokens=sum(_tokens(t) for t in texts))


def embedding(config: ServerConfig) -> MicroService:
    """EmbeddingService: a fixed 768-float vector per input."""
    backend = FixedEmbedder()
    servicer = EmbeddingServicer(backend, max_inputs=2048, max_input_chars=100_000)
    return (
        MicroService("embedding", service_type=ServiceType.EMBEDDING, config=config)
        .add_service(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, servicer)
        .add_service(
            models.add_to_server,
            _catalog(EMBEDDING_MODEL, common_pb2.MODEL_KIND_EMBEDDING, dimensions=DIMENSIONS),
        )
    )


# -- retrieval ---------------------------------------------------------------------------------


class FixedStore:
    """Finds the same three documents for any search (``services.retrieval.backend.Backend``).

    Writes are counted and forgotten; every collection exists.
    """

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def search(
        self,
        collection: str,
        vector: Vector | None,
        query: str,
        top_k: int,
        conditions: Sequence[Condition],
        score_threshold: float | None,
    ) -> list[Hit]:
        return list(HITS[:top_k])

    async def upsert(self, collection: str, records: Sequence[Record]) -> int:
        return len(records)

    async def delete(
        self, collection: str, ids: Sequence[str], conditions: Sequence[Condition]
    ) -> int:
        return len(ids)

    async def collections(self) -> list[CollectionInfo]:
        return [CollectionInfo(COLLECTION, DIMENSIONS, len(HITS))]

    async def drop(self, collection: str) -> bool:
        return True


def retrieval(config: ServerConfig) -> MicroService:
    """RetrievalService: three fixed documents for any search; writes accepted and dropped."""
    servicer = RetrievalServicer(FixedStore(), RetrievalSettings(default_collection=COLLECTION))
    return (
        MicroService("retrieval", service_type=ServiceType.RETRIEVER, config=config)
        .add_service(retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server, servicer)
        .add_service(models.add_to_server, models.ModelCatalog(list))
    )


# -- rerank ------------------------------------------------------------------------------------


class FirstReranker:
    """Keeps the first candidate only (``services.rerank.backend.Reranker``)."""

    @property
    def model(self) -> str:
        return RERANK_MODEL

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def rerank(self, query: str, texts: Sequence[str], top_n: int | None) -> Ranking:
        return Ranking((Ranked(0, 1.0),), tokens=_tokens(query))


def rerank(config: ServerConfig) -> MicroService:
    """RerankService: the top candidate (the first one given) alone."""
    servicer = RerankServicer(FirstReranker(), max_documents=1000)
    return (
        MicroService("rerank", service_type=ServiceType.RERANK, config=config)
        .add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, servicer)
        .add_service(models.add_to_server, _catalog(RERANK_MODEL, common_pb2.MODEL_KIND_RERANK))
    )


# -- chat --------------------------------------------------------------------------------------


def _usage(prompt: Prompt) -> TokenUsage:
    prompt_tokens = sum(_tokens(m.content) for m in prompt.messages)
    prompt_tokens += sum(_tokens(d) for d in prompt.documents)
    return TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=len(ANSWER_TOKENS))


class FixedChat:
    """Answers every prompt with :data:`ANSWER` (``services.chat.backend.ChatBackend``)."""

    @property
    def model(self) -> str:
        return CHAT_MODEL

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def complete(self, prompt: Prompt) -> Completion:
        return Completion(ANSWER, Finish.STOP, _usage(prompt))

    async def stream(self, prompt: Prompt) -> AsyncGenerator[Delta | TokenUsage, None]:
        last = len(ANSWER_TOKENS) - 1
        for i, token in enumerate(ANSWER_TOKENS):
            yield Delta(token, Finish.STOP if i == last else None)
        yield _usage(prompt)


def chat(config: ServerConfig) -> MicroService:
    """ChatService: a fixed 32-token answer, whole or streamed one token per message."""
    return (
        MicroService("chat", service_type=ServiceType.LLM, config=config)
        .add_service(chat_pb2_grpc.add_ChatServiceServicer_to_server, ChatServicer(FixedChat()))
        .add_service(models.add_to_server, _catalog(CHAT_MODEL, common_pb2.MODEL_KIND_CHAT))
    )
