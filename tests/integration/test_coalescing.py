"""Coalescer against real embedding and retrieval services: which calls leave, what each caller
gets.

The embedding service is the built-in servicer on loopback over a recording backend (the hashing
embedder behind the ``Embedder`` Protocol) that notes the texts of each call and can hold a call
until the test lets it go; the retrieval service is the built-in one over its local backend. A
server interceptor notes the method of every call that arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from opea_grpc import coalescing
from opea_grpc.client import EmbeddingClient, RerankClient, RetrievalClient
from opea_grpc.coalescing import Coalescer
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import (
    common_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from opea_grpc.server import MicroService, ServiceType
from opea_grpc.testing import started
from services.embedding.backend import Embeddings, ModelInfo
from services.embedding.hashing import HashingEmbedder
from services.embedding.servicer import EmbeddingServicer
from services.rerank.backend import make_backend as make_reranker
from services.rerank.service import Settings as RerankSettings
from services.rerank.servicer import RerankServicer
from services.retrieval.backend import make_backend
from services.retrieval.service import Settings as RetrievalSettings
from services.retrieval.servicer import RetrievalServicer

#: No retries, no health checking: a status reaches the coalescer as the service answered it.
DIRECT = ClientConfig(max_attempts=1, health_check=False)


class Arrivals(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in stubs only
    """The method name of every call the server receives, in order."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        self.methods.append(details.method.rsplit("/", 1)[-1])
        return await continuation(details)


@dataclass
class Recording:
    """The hashing embedder, noting each call's texts; ``hold`` keeps calls waiting."""

    inner: HashingEmbedder = field(default_factory=lambda: HashingEmbedder(dimensions=16))
    calls: list[list[str]] = field(default_factory=list)
    hold: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def embed(self, texts: Sequence[str], *, user: str = "") -> Embeddings:
        self.calls.append(list(texts))
        self.entered.set()
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return await self.inner.embed(texts, user=user)


@dataclass(frozen=True)
class Setup:
    backend: Recording
    client: EmbeddingClient
    arrivals: Arrivals


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    backend = Recording()
    arrivals = Arrivals()
    service = MicroService(
        "embedding",
        service_type=ServiceType.EMBEDDING,
        config=ServerConfig(port=0, grace=0.5),
        interceptors=[arrivals],
    ).add_service(
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
        EmbeddingServicer(backend, max_inputs=64, max_input_chars=1000),
        ready=backend.ready,
    )
    service.on_start(backend.start).on_stop(backend.close)
    async with started(service, DIRECT) as channel:
        yield Setup(backend, EmbeddingClient(channel), arrivals)


def embedder(setup: Setup, max_batch: int = 32) -> Coalescer[Any, Any]:
    return Coalescer(coalescing.embedding(setup.client), max_batch=max_batch)


def ask(text: str, **fields: object) -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(input=[text], **fields)  # type: ignore[arg-type]


def vector(reply: embedding_pb2.EmbedResponse) -> list[float]:
    assert [item.index for item in reply.data] == [0]
    return list(reply.data[0].embedding)


async def test_texts_asked_together_share_one_call(setup: Setup) -> None:
    embed = embedder(setup)
    texts = [f"question number {i}" for i in range(5)]
    replies = await asyncio.gather(*(embed(ask(t), timeout=5) for t in texts))
    assert setup.backend.calls == [texts]
    assert (embed.calls, embed.requests) == (1, 5)
    for text, reply in zip(texts, replies, strict=True):
        alone = await setup.client.embed(ask(text), timeout=5)
        assert vector(reply) == pytest.approx(vector(alone))
        assert reply.model == alone.model


async def test_a_lone_call_goes_as_it_is(setup: Setup) -> None:
    embed = embedder(setup)
    reply = await embed(ask("just one"), timeout=5)
    assert setup.backend.calls == [["just one"]]
    assert reply.usage.prompt_tokens > 0  # the service's own reply, usage included


async def test_the_same_text_is_sent_once(setup: Setup) -> None:
    embed = embedder(setup)
    a1, b, a2 = await asyncio.gather(*(embed(ask(t), timeout=5) for t in ("a", "b", "a")))
    assert setup.backend.calls == [["a", "b"]]
    assert vector(a1) == vector(a2) != vector(b)


async def test_calls_differing_beyond_the_text_are_not_merged(setup: Setup) -> None:
    embed = embedder(setup)
    await asyncio.gather(
        embed(ask("x", user="u1"), timeout=5),
        embed(ask("y", user="u2"), timeout=5),
        embed(ask("z", user="u1"), timeout=5),
        embed(ask("w", user="u1", dimensions=8), timeout=5),
    )
    assert sorted(setup.backend.calls) == [["w"], ["x", "z"], ["y"]]


async def test_a_batch_holds_at_most_max_inputs(setup: Setup) -> None:
    embed = embedder(setup, max_batch=2)
    await asyncio.gather(*(embed(ask(f"t{i}"), timeout=5) for i in range(5)))
    assert setup.backend.calls == [["t0", "t1"], ["t2", "t3"], ["t4"]]


async def test_one_bad_text_fails_only_its_caller(setup: Setup) -> None:
    embed = embedder(setup)
    good: object
    bad: object
    fine: object
    good, bad, fine = await asyncio.gather(
        embed(ask("good"), timeout=5),
        embed(ask(""), timeout=5),
        embed(ask("fine"), timeout=5),
        return_exceptions=True,
    )
    assert isinstance(bad, grpc.aio.AioRpcError)
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "input[0] is an empty string" in (bad.details() or "")  # its own index, not the batch's
    assert isinstance(good, embedding_pb2.EmbedResponse)
    assert isinstance(fine, embedding_pb2.EmbedResponse)
    assert setup.backend.calls == [["good"], ["fine"]]  # the merged call never reached it
    assert setup.arrivals.methods == ["Embed"] * 4  # the merged one, then each text alone


async def test_a_failure_of_the_call_reaches_every_caller_once(setup: Setup) -> None:
    embed = embedder(setup)
    results = await asyncio.gather(
        *(embed(ask(t, model="no-such-model"), timeout=5) for t in ("a", "b")),
        return_exceptions=True,
    )
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() is grpc.StatusCode.NOT_FOUND
    assert setup.arrivals.methods == ["Embed"]  # not a text's fault: not asked text by text


async def test_each_caller_keeps_its_own_deadline(setup: Setup) -> None:
    setup.backend.hold = asyncio.Event()
    embed = embedder(setup)
    hasty = asyncio.ensure_future(embed(ask("hasty"), timeout=0.2))
    patient = asyncio.ensure_future(embed(ask("patient"), timeout=30))
    with pytest.raises(ServiceError) as failed:
        await hasty
    assert failed.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not patient.done()
    setup.backend.hold.set()
    assert vector(await patient)
    assert setup.backend.calls == [["hasty", "patient"]]


async def test_callers_that_leave_cancel_the_call(setup: Setup) -> None:
    setup.backend.hold = asyncio.Event()
    embed = embedder(setup)
    callers = [asyncio.ensure_future(embed(ask(t), timeout=30)) for t in ("a", "b")]
    await asyncio.wait_for(setup.backend.entered.wait(), 10)
    callers[0].cancel()
    await asyncio.sleep(0)
    assert not setup.backend.cancelled.is_set()  # one caller still waits
    callers[1].cancel()
    await asyncio.wait_for(setup.backend.cancelled.wait(), 10)  # seen by the service
    assert all(c.cancelled() for c in callers)


async def test_max_inputs_one_sends_each_request(setup: Setup) -> None:
    embed = embedder(setup, max_batch=1)
    await asyncio.gather(*(embed(ask(t), timeout=5) for t in ("a", "b")))
    assert sorted(setup.backend.calls) == [["a"], ["b"]]
    with pytest.raises(ValueError, match="max_batch"):
        embedder(setup, max_batch=0)


# -- retrieval ---------------------------------------------------------------------------------

DOCS = {"ports": "The gateway listens on port 8888.", "health": "Health checks use grpc.health."}


def unit(i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(4)]


@dataclass(frozen=True)
class Index:
    client: RetrievalClient
    arrivals: Arrivals


def add_search_only(servicer: RetrievalServicer, server: Any) -> None:
    """A retrieval service of a version that knew no SearchBatch."""
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Search,
        request_deserializer=retrieval_pb2.SearchRequest.FromString,
        response_serializer=retrieval_pb2.SearchResponse.SerializeToString,
    )
    server.add_registered_method_handlers("opea.v1.RetrievalService", {"Search": handler})


async def retrieval_index(data: Path, *, batch: bool) -> AsyncIterator[Index]:
    settings = RetrievalSettings(data_dir=str(data))
    backend = make_backend(settings)
    arrivals = Arrivals()
    servicer = RetrievalServicer(backend, settings)
    service = (
        MicroService(
            "retrieval",
            service_type=ServiceType.RETRIEVER,
            config=ServerConfig(port=0, grace=0.5),
            interceptors=[arrivals],
        )
        .add_service(
            retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server if batch else add_search_only,
            servicer,
            ready=backend.ready,
        )
        .on_start(backend.start)
        .on_stop(backend.close)
    )
    async with started(service, DIRECT) as channel:
        client = RetrievalClient(channel)
        documents = [
            common_pb2.Document(id=name, text=text, embedding=unit(i))
            for i, (name, text) in enumerate(DOCS.items())
        ]
        await servicer.Upsert(retrieval_pb2.UpsertRequest(documents=documents), None)  # type: ignore[arg-type]
        arrivals.methods.clear()
        yield Index(client, arrivals)


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[Index]:
    async for i in retrieval_index(tmp_path, batch=True):
        yield i


def search(vector: list[float], **fields: Any) -> retrieval_pb2.SearchRequest:
    return retrieval_pb2.SearchRequest(vector=vector, top_k=2, **fields)


async def test_searches_asked_together_share_one_batch(index: Index) -> None:
    find = Coalescer(coalescing.retrieval(index.client))
    requests = [search(unit(0)), search(unit(1)), search(unit(0), query="port")]
    replies = await asyncio.gather(*(find(r, timeout=5) for r in requests))
    assert index.arrivals.methods == ["SearchBatch"]
    for request, reply in zip(requests, replies, strict=True):
        alone = await index.client.search(request, timeout=5)
        assert reply == alone
    assert replies[0].documents[0].document.id == "ports"
    assert replies[1].documents[0].document.id == "health"


async def test_a_refused_search_fails_only_its_caller(index: Index) -> None:
    find = Coalescer(coalescing.retrieval(index.client))
    good, zero, missing = await asyncio.gather(
        find(search(unit(1)), timeout=5),
        find(search([0.0] * 4), timeout=5),
        find(search(unit(0), collection="nowhere"), timeout=5),
        return_exceptions=True,
    )
    assert isinstance(good, retrieval_pb2.SearchResponse)
    assert isinstance(zero, ServiceError)
    assert zero.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "all zeros" in zero.message
    assert isinstance(missing, ServiceError)
    assert missing.code is grpc.StatusCode.NOT_FOUND  # what Search answers it, message and all
    assert "collection 'nowhere' does not exist" in missing.message
    assert index.arrivals.methods == ["SearchBatch"]


async def test_the_service_refuses_an_empty_or_oversized_batch(index: Index) -> None:
    for searches, words in (([], "requests is empty"), ([search(unit(0))] * 257, "the limit")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await index.client.search_batch(
                retrieval_pb2.SearchBatchRequest(requests=searches), timeout=5
            )
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert words in (refused.value.details() or "")


async def test_a_service_without_search_batch_gets_each_search_alone(tmp_path: Path) -> None:
    async for old in retrieval_index(tmp_path, batch=False):
        find = Coalescer(coalescing.retrieval(old.client))
        first = await asyncio.gather(*(find(search(unit(i)), timeout=5) for i in (0, 1)))
        later = await asyncio.gather(*(find(search(unit(i)), timeout=5) for i in (0, 1)))
        assert [r.documents[0].document.id for r in first + later] == ["ports", "health"] * 2
        # One batch refused as UNIMPLEMENTED, its searches sent alone; never a batch again.
        assert old.arrivals.methods == ["SearchBatch"] + ["Search"] * 4


# -- rerank ------------------------------------------------------------------------------------


@pytest.fixture
async def ranker() -> AsyncIterator[tuple[RerankClient, Arrivals]]:
    arrivals = Arrivals()
    backend = make_reranker(RerankSettings())
    service = (
        MicroService(
            "rerank",
            service_type=ServiceType.RERANK,
            config=ServerConfig(port=0, grace=0.5),
            interceptors=[arrivals],
        )
        .add_service(
            rerank_pb2_grpc.add_RerankServiceServicer_to_server,
            RerankServicer(backend, max_documents=100),
            ready=backend.ready,
        )
        .on_start(backend.start)
        .on_stop(backend.close)
    )
    async with started(service, DIRECT) as channel:
        yield RerankClient(channel), arrivals


def ranking(query: str) -> rerank_pb2.RerankRequest:
    documents = [common_pb2.Document(id=name, text=text) for name, text in DOCS.items()]
    return rerank_pb2.RerankRequest(query=query, documents=documents, top_n=1)


async def test_rerankings_asked_together_share_one_batch(
    ranker: tuple[RerankClient, Arrivals],
) -> None:
    client, arrivals = ranker
    rank = Coalescer(coalescing.rerank(client))
    requests = [ranking("which port"), ranking("health checks"), ranking("")]
    port, health, empty = await asyncio.gather(
        *(rank(r, timeout=5) for r in requests), return_exceptions=True
    )
    assert arrivals.methods == ["RerankBatch"]
    assert isinstance(port, rerank_pb2.RerankResponse)
    assert isinstance(health, rerank_pb2.RerankResponse)
    assert port == await client.rerank(requests[0], timeout=5)
    assert port.results[0].document.id == "ports"
    assert health.results[0].document.id == "health"
    assert isinstance(empty, ServiceError)  # refused alone, as Rerank refuses it
    assert empty.code is grpc.StatusCode.INVALID_ARGUMENT


class WithoutBatches(rerank_pb2_grpc.RerankServiceServicer):
    """A reranker written before RerankBatch: the generated base class answers it."""

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rerank_pb2.RerankResponse:
        return rerank_pb2.RerankResponse(model=request.query)


async def test_a_reranker_without_batches_answers_unimplemented_and_gets_each_alone() -> None:
    arrivals = Arrivals()
    service = MicroService(
        "plain-rerank", config=ServerConfig(port=0, grace=0.5), interceptors=[arrivals]
    ).add_service(
        rerank_pb2_grpc.add_RerankServiceServicer_to_server,
        WithoutBatches(),  # type: ignore[abstract]
    )
    async with started(service, DIRECT) as channel:
        client = RerankClient(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.rerank_batch(
                rerank_pb2.RerankBatchRequest(requests=[ranking("q")]), timeout=5
            )
        assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "RerankBatch is not implemented" in (refused.value.details() or "")
        arrivals.methods.clear()
        rank = Coalescer(coalescing.rerank(client))
        replies = await asyncio.gather(rank(ranking("a"), timeout=5), rank(ranking("b"), timeout=5))
        assert [r.model for r in replies] == ["a", "b"]
        assert arrivals.methods == ["RerankBatch", "Rerank", "Rerank"]
