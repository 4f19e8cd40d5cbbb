"""Typed clients for the opea.v1 services.

Each wraps a generated stub on a long-lived channel (see :mod:`opea_grpc.channel`). Every call
carries ``timeout=``: the one given, else the client's default, in both cases shortened to what
the request being served has left (:mod:`opea_grpc.deadline`), because gRPC Python neither
propagates deadlines nor applies the service config's per-method timeout.

>>> client = RerankClient(channels.get("127.0.0.1:50053", [RerankClient.SERVICE]))
>>> response = await client.rerank(RerankRequest(query="q", documents=docs), timeout=2.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import grpc

from opea_grpc import deadline, logs, telemetry
from opea_grpc.breaker import Breaker
from opea_grpc.errors import ServiceError
from opea_grpc.logs import REQUEST_ID_KEY
from opea_grpc.pb.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    chatqna_pb2,
    chatqna_pb2_grpc,
    common_pb2,
    common_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from opea_grpc.retry import RetryBudget

Metadata = Sequence[tuple[str, str | bytes]]
Req = TypeVar("Req")
Resp = TypeVar("Resp")

DEFAULT_TIMEOUT = 10.0
#: What the typed clients retry themselves: UNAVAILABLE (a replica gone mid-reply) and a
#: CANCELLED that the server sent (a replica stopping as the call arrived; a call this process
#: cancels ends in CancelledError instead, and is never retried).
_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
#: What a call without a breaker enters instead of one of its tickets.
_UNGUARDED = contextlib.nullcontext()


def _tagged(metadata: Metadata | None) -> Metadata | None:
    """``metadata`` with the request id being served, so the callee's logs carry it too."""
    rid = logs.request_id.get()
    if not rid:
        return metadata
    return ((REQUEST_ID_KEY, rid),) if metadata is None else (*metadata, (REQUEST_ID_KEY, rid))


def _name(method: object) -> str:
    """The ``/package.Service/Method`` a stub's callable calls."""
    name = getattr(method, "_method", b"")
    return name.decode() if isinstance(name, bytes) else str(name or "unknown")


class _Client:
    """What every typed client shares: channel, default timeout, retry budget, breaker.

    With a ``breaker`` (:mod:`opea_grpc.breaker`) every call is admitted by it first: while it
    is open calls fail at once with UNAVAILABLE naming the downstream; without one, calls pay
    nothing for it.
    """

    SERVICE: ClassVar[str] = ""
    #: Each call carries its timeout as the gRPC deadline: callers need no timer of their own.
    deadline_bound: ClassVar[bool] = True
    _STUB: ClassVar[type[Any]]

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_budget: RetryBudget | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.channel = channel
        self.timeout = timeout
        self.retry_budget = retry_budget if retry_budget is not None else RetryBudget()
        self.breaker = breaker
        self._stub = type(self)._STUB(channel)

    def _timeout(self, timeout: float | None) -> float:
        return deadline.bound(self.timeout if timeout is None else timeout)

    def _unary(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: object,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> Awaitable[Resp]:
        """Call; retry an UNAVAILABLE or CANCELLED that gRPC did not, while time and budget last.
        (A plain function: untraced, the typed method awaits the call itself, one coroutine
        fewer per call.)"""
        if telemetry.tracer is None:
            return self._call(method, request, timeout, metadata)
        return self._traced_call(method, request, timeout, metadata)

    async def _traced_call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: object,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> Resp:
        span, context = telemetry.client_span(_name(method))
        code, message = grpc.StatusCode.OK, ""
        try:
            return await self._call(method, request, timeout, (*(metadata or ()), *context))
        except grpc.aio.AioRpcError as exc:
            code, message = exc.code(), exc.details() or ""
            raise
        except ServiceError as exc:  # refused by the breaker
            code, message = exc.code, exc.message
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            telemetry.end(span, code, message)

    async def _call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: object,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> Resp:
        breaker = self.breaker
        seconds = self._timeout(timeout)
        with _UNGUARDED if breaker is None else breaker.admit(seconds):
            budget = self.retry_budget
            budget.deposit()
            expires = time.monotonic() + seconds
            metadata = _tagged(metadata)
            while True:
                try:
                    return await method(request, timeout=seconds, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    seconds = expires - time.monotonic()
                    if exc.code() not in _RETRIED or seconds <= 0 or not budget.withdraw():
                        raise

    def _stream(
        self,
        method: Callable[..., grpc.aio.UnaryStreamCall[object, Resp]],
        request: object,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> AsyncIterator[Resp]:
        """Relay a stream; retry as :meth:`_unary` before the first message; cancel when
        abandoned."""
        if telemetry.tracer is None:
            return self._relay(method, request, timeout, metadata)
        return self._traced(method, request, timeout, metadata)

    async def _traced(
        self,
        method: Callable[..., grpc.aio.UnaryStreamCall[object, Resp]],
        request: object,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> AsyncIterator[Resp]:
        # The span is not made current: the generator may be resumed and closed from elsewhere.
        span, context = telemetry.client_span(_name(method))
        code, details, count = grpc.StatusCode.OK, "", 0
        relay = self._relay(method, request, timeout, (*(metadata or ()), *context))
        try:
            async with contextlib.aclosing(relay):  # closing this closes the call at once
                async for message in relay:
                    count += 1
                    yield message
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            raise
        except ServiceError as exc:
            code, details = exc.code, exc.message
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if span is not None:
                span.set_attribute("opea.stream.messages", count)
            telemetry.end(span, code, details)

    async def _relay(
        self,
        method: Callable[..., grpc.aio.UnaryStreamCall[object, Resp]],
        request: object,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> AsyncGenerator[Resp, None]:
        breaker = self.breaker
        seconds = self._timeout(timeout)
        with _UNGUARDED if breaker is None else breaker.admit(seconds):
            budget = self.retry_budget
            budget.deposit()
            expires = time.monotonic() + seconds
            metadata = _tagged(metadata)
            while True:
                call = method(request, timeout=seconds, metadata=metadata)
                started = False
                try:
                    async for message in call:
                        started = True
                        yield message
                    return
                except grpc.aio.AioRpcError as exc:
                    seconds = expires - time.monotonic()
                    if (
                        started
                        or exc.code() not in _RETRIED
                        or seconds <= 0
                        or not budget.withdraw()
                    ):
                        raise
                finally:
                    call.cancel()


class EmbeddingClient(_Client):
    SERVICE = "opea.v1.EmbeddingService"

    _STUB = embedding_pb2_grpc.EmbeddingServiceStub

    async def embed(
        self,
        request: embedding_pb2.EmbedRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> embedding_pb2.EmbedResponse:
        return await self._unary(self._stub.Embed, request, timeout, metadata)


class RetrievalClient(_Client):
    SERVICE = "opea.v1.RetrievalService"

    _STUB = retrieval_pb2_grpc.RetrievalServiceStub

    async def search(
        self,
        request: retrieval_pb2.SearchRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> retrieval_pb2.SearchResponse:
        return await self._unary(self._stub.Search, request, timeout, metadata)

    async def search_batch(
        self,
        request: retrieval_pb2.SearchBatchRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> retrieval_pb2.SearchBatchResponse:
        return await self._unary(self._stub.SearchBatch, request, timeout, metadata)

    async def upsert(
        self,
        request: retrieval_pb2.UpsertRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> retrieval_pb2.UpsertResponse:
        return await self._unary(self._stub.Upsert, request, timeout, metadata)

    async def delete(
        self,
        request: retrieval_pb2.DeleteRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> retrieval_pb2.DeleteResponse:
        return await self._unary(self._stub.Delete, request, timeout, metadata)

    async def list_collections(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> retrieval_pb2.ListCollectionsResponse:
        return await self._unary(
            self._stub.ListCollections, retrieval_pb2.ListCollectionsRequest(), timeout, metadata
        )

    async def delete_collection(
        self, name: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> retrieval_pb2.DeleteCollectionResponse:
        return await self._unary(
            self._stub.DeleteCollection,
            retrieval_pb2.DeleteCollectionRequest(name=name),
            timeout,
            metadata,
        )


class RerankClient(_Client):
    SERVICE = "opea.v1.RerankService"

    _STUB = rerank_pb2_grpc.RerankServiceStub

    async def rerank(
        self,
        request: rerank_pb2.RerankRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> rerank_pb2.RerankResponse:
        return await self._unary(self._stub.Rerank, request, timeout, metadata)

    async def rerank_batch(
        self,
        request: rerank_pb2.RerankBatchRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> rerank_pb2.RerankBatchResponse:
        return await self._unary(self._stub.RerankBatch, request, timeout, metadata)


class ChatClient(_Client):
    SERVICE = "opea.v1.ChatService"

    _STUB = chat_pb2_grpc.ChatServiceStub

    async def chat(
        self,
        request: chat_pb2.ChatRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> chat_pb2.ChatResponse:
        return await self._unary(self._stub.Chat, request, timeout, metadata)

    def chat_stream(
        self,
        request: chat_pb2.ChatRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[chat_pb2.ChatStreamResponse]:
        """The completion's chunks as they arrive; closing the iterator cancels the call."""
        return self._stream(
            self._stub.ChatStream, chat_pb2.ChatStreamRequest(request=request), timeout, metadata
        )


class ChatQnAClient(_Client):
    SERVICE = "opea.v1.ChatQnAService"

    _STUB = chatqna_pb2_grpc.ChatQnAServiceStub

    async def ask(
        self,
        request: chatqna_pb2.AskRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> chatqna_pb2.AskResponse:
        return await self._unary(self._stub.Ask, request, timeout, metadata)

    def ask_stream(
        self,
        request: chatqna_pb2.AskRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[chatqna_pb2.AskStreamResponse]:
        return self._stream(
            self._stub.AskStream, chatqna_pb2.AskStreamRequest(request=request), timeout, metadata
        )


class ModelClient(_Client):
    SERVICE = "opea.v1.ModelService"

    _STUB = common_pb2_grpc.ModelServiceStub

    async def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> common_pb2.ListModelsResponse:
        return await self._unary(
            self._stub.ListModels, common_pb2.ListModelsRequest(), timeout, metadata
        )
