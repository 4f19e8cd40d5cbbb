"""The ChatQnA megaservice: embedding -> retrieval -> rerank -> chat, as an orchestrator graph.

One :class:`ChatQnA` serves the gateway's REST routes and its gRPC face alike. A request may
turn retrieval or rerank off; each combination is its own graph, compiled once. The embedding
of a query text and the results of a search are cached (``OPEA_GATEWAY_CACHE_*``); a write to
a collection through the gateway (ingest, delete) drops the cached searches, so no stale passage
outlives it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from gateway.settings import Settings
from opea_grpc import coalescing
from opea_grpc.cache import MemoryCache, RedisCache
from opea_grpc.client import ChatClient, EmbeddingClient, RerankClient, RetrievalClient
from opea_grpc.coalescing import Coalescer
from opea_grpc.errors import ServiceError
from opea_grpc.node import REQUEST, Node, NodeStatus, NodeTiming
from opea_grpc.orchestrator import ServiceOrchestrator
from opea_grpc.pb.v1 import (
    chat_pb2,
    chatqna_pb2,
    common_pb2,
    embedding_pb2,
    rerank_pb2,
    retrieval_pb2,
)
from opea_grpc.run import StreamRun

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
#: Most candidates one request may retrieve.
MAX_TOP_K = 1000


@dataclass
class Question:
    """The state of one run: what was asked, and how to look for the answer."""

    ask: chatqna_pb2.AskRequest
    query: str
    collection: str
    top_k: int
    top_n: int
    sources: list[common_pb2.ScoredDocument] = field(default_factory=list)


@dataclass(frozen=True)
class Answer:
    """A finished unary run."""

    response: chat_pb2.ChatResponse
    sources: list[common_pb2.ScoredDocument]
    timings: tuple[NodeTiming, ...]
    degraded: bool


@dataclass(frozen=True)
class Downstreams:
    """The typed clients the pipeline calls (rerank may be absent)."""

    embedding: EmbeddingClient
    retrieval: RetrievalClient
    chat: ChatClient
    rerank: RerankClient | None = None


def query_of(messages: Sequence[chat_pb2.ChatMessage]) -> str:
    """The text retrieval looks for: the last user message."""
    for message in reversed(messages):
        if message.role == chat_pb2.ROLE_USER and message.content.strip():
            return str(message.content)
    raise ServiceError(
        _INVALID, "messages holds no user message with text: retrieval needs a question"
    )


def _embed(question: Question, done: Mapping[str, object]) -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(input=[question.query])


def _search(question: Question, done: Mapping[str, object]) -> retrieval_pb2.SearchRequest:
    embedded = done["embed"]
    assert isinstance(embedded, embedding_pb2.EmbedResponse)
    if not embedded.data:
        raise ServiceError(grpc.StatusCode.INTERNAL, "the embedding service returned no vector")
    rag = question.ask.rag
    return retrieval_pb2.SearchRequest(
        collection=question.collection,
        vector=embedded.data[0].embedding,
        query=question.query,
        top_k=question.top_k,
        filter=rag.filter if rag.HasField("filter") else None,
    )


def _found(question: Question, search: retrieval_pb2.SearchResponse) -> None:
    question.sources = list(search.documents[: question.top_n])


def _rerank(question: Question, done: Mapping[str, object]) -> rerank_pb2.RerankRequest:
    found = done["retrieve"]
    assert isinstance(found, retrieval_pb2.SearchResponse)
    return rerank_pb2.RerankRequest(
        query=question.query,
        documents=[hit.document for hit in found.documents],
        top_n=question.top_n,
    )


def _reranked(question: Question, reply: rerank_pb2.RerankResponse) -> None:
    question.sources = [
        common_pb2.ScoredDocument(document=r.document, score=r.relevance_score)
        for r in reply.results
    ]


def _chat(question: Question, done: Mapping[str, object]) -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest()
    request.CopyFrom(question.ask.chat)
    del request.documents[:]
    request.documents.extend(hit.document for hit in question.sources)
    return request


def _chat_only(question: Question, done: Mapping[str, object]) -> chat_pb2.ChatRequest:
    assert REQUEST in done
    return question.ask.chat


def _cache(settings: Settings, node: str) -> MemoryCache | RedisCache | None:
    if not settings.cache_size:
        return None
    if settings.cache_url:
        return RedisCache(settings.cache_url, namespace=f"opea:{node}", ttl=settings.cache_ttl)
    return MemoryCache(settings.cache_size, ttl=settings.cache_ttl)


class ChatQnA:
    """The pipeline, its caches, and the three graphs a request can choose from."""

    def __init__(self, settings: Settings, downstreams: Downstreams) -> None:
        self.settings = settings
        self.downstreams = downstreams
        self.embed_cache = _cache(settings, "embed")
        self.search_cache = _cache(settings, "retrieve")
        #: Query embeddings, searches and rerankings asked for together share one call each.
        most = settings.coalesce
        self.embed = Coalescer(coalescing.embedding(downstreams.embedding), max_batch=most)
        self.search = Coalescer(coalescing.retrieval(downstreams.retrieval), max_batch=most)
        self.rerank = (
            Coalescer(coalescing.rerank(downstreams.rerank), max_batch=most)
            if downstreams.rerank is not None
            else None
        )
        self._graphs = {
            (True, True): self._graph(retrieval=True, rerank=True),
            (True, False): self._graph(retrieval=True, rerank=False),
            (False, False): self._graph(retrieval=False, rerank=False),
        }

    def _graph(self, *, retrieval: bool, rerank: bool) -> ServiceOrchestrator[Question]:
        s, d = self.settings, self.downstreams
        chat = Node(
            "chat",
            d.chat.chat,
            stream=d.chat.chat_stream,
            timeout=s.max_timeout,
            prepare=_chat if retrieval else _chat_only,
        )
        graph = ServiceOrchestrator[Question]().add(chat)
        if not retrieval:
            return graph
        embed = Node(
            "embed",
            self.embed,
            input_type=embedding_pb2.EmbedRequest,
            output_type=embedding_pb2.EmbedResponse,
            timeout=s.embed_timeout,
            prepare=_embed,
            cache=self.embed_cache,
        )
        retrieve = Node(
            "retrieve",
            self.search,
            input_type=retrieval_pb2.SearchRequest,
            output_type=retrieval_pb2.SearchResponse,
            timeout=s.retrieve_timeout,
            prepare=_search,
            absorb=_found,
            cache=self.search_cache,
        )
        graph.add(embed).add(retrieve).flow_to("embed", "retrieve")
        if rerank and self.rerank is not None:
            rank = Node(
                "rerank",
                _Rerank(self.rerank),
                timeout=s.rerank_timeout,
                optional=s.rerank_optional,
                prepare=_rerank,
                absorb=_reranked,
            )
            graph.add(rank).flow_to("retrieve", "rerank").flow_to("rerank", "chat")
        else:
            graph.flow_to("retrieve", "chat")
        return graph

    def observe(self, observer: Callable[[NodeTiming], None]) -> None:
        """Tell ``observer`` of every node of every request as it ends (the node metrics)."""
        for graph in self._graphs.values():
            graph.observe(observer)

    def graph(
        self, *, retrieval: bool = True, rerank: bool = True
    ) -> ServiceOrchestrator[Question]:
        """The graph a request with these switches runs."""
        return self._graphs[(retrieval, rerank and retrieval)]

    def question(self, request: chatqna_pb2.AskRequest) -> Question:
        """Validate ``request`` and make the run's state; raises INVALID_ARGUMENT."""
        if not request.chat.messages:
            raise ServiceError(_INVALID, "messages is empty: send at least one user message")
        rag, s = request.rag, self.settings
        top_k = rag.top_k if rag.HasField("top_k") else s.top_k
        top_n = rag.top_n if rag.HasField("top_n") else s.top_n
        if not 1 <= top_k <= MAX_TOP_K:
            raise ServiceError(_INVALID, f"top_k is {top_k}: it must be within 1..{MAX_TOP_K}")
        if not top_n >= 1:
            raise ServiceError(_INVALID, f"top_n is {top_n}: it must be at least 1")
        query = "" if rag.disable_retrieval else query_of(request.chat.messages)
        return Question(request, query, rag.collection or s.collection, top_k, min(top_n, top_k))

    def _choose(self, question: Question) -> ServiceOrchestrator[Question]:
        rag = question.ask.rag
        return self.graph(retrieval=not rag.disable_retrieval, rerank=not rag.disable_rerank)

    async def ask(self, request: chatqna_pb2.AskRequest, *, timeout: float) -> Answer:
        """Run the pipeline once; raises :class:`~opea_grpc.errors.NodeError` on failure."""
        question = self.question(request)
        result = await self._choose(question).run(request, state=question, timeout=timeout)
        reply = result.outputs["chat"]
        assert isinstance(reply, chat_pb2.ChatResponse)
        return Answer(reply, question.sources, result.timings, result.degraded)

    def ask_stream(self, request: chatqna_pb2.AskRequest, *, timeout: float) -> StreamRun[Question]:
        """The streamed run: iterate it for the chat chunks; ``state.sources`` once started."""
        question = self.question(request)
        return self._choose(question).stream(request, state=question, timeout=timeout)

    async def start(self) -> None:
        for cache in (self.embed_cache, self.search_cache):
            if isinstance(cache, RedisCache):
                await cache.start()

    async def close(self) -> None:
        for cache in (self.embed_cache, self.search_cache):
            if isinstance(cache, RedisCache):
                await cache.close()

    async def collection_changed(self, collection: str) -> None:
        """A write to ``collection``: cached searches may be stale, drop them."""
        if self.search_cache is not None:
            await self.search_cache.clear()


class _Rerank:
    """Rerank, except that nothing to rank needs no call."""

    deadline_bound = True  # the coalescer keeps each request's deadline

    def __init__(
        self, rerank: Coalescer[rerank_pb2.RerankRequest, rerank_pb2.RerankResponse]
    ) -> None:
        self._rerank = rerank

    async def __call__(
        self, request: rerank_pb2.RerankRequest, *, timeout: float
    ) -> rerank_pb2.RerankResponse:
        if not request.documents:
            return rerank_pb2.RerankResponse()
        return await self._rerank(request, timeout=timeout)


def node_reports(timings: tuple[NodeTiming, ...]) -> list[chatqna_pb2.NodeReport]:
    """The timings as ``opea.v1.NodeReport`` messages."""
    return [
        chatqna_pb2.NodeReport(
            name=t.name,
            status=int(t.status),  # type: ignore[arg-type]
            duration_ms=t.duration * 1000,
            message=t.message,
        )
        for t in timings
    ]


__all__ = ["Answer", "ChatQnA", "Downstreams", "NodeStatus", "Question", "node_reports"]
