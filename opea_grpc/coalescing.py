"""Concurrent calls of the same kind sent downstream as one (dynamic batching, no queue delay).

Under load many requests reach the same step at once: the gateway parses a burst of HTTP
requests in one pass of the event loop, and each then asks the embedding service for the vector
of its question and the retrieval service for its passages. Each of those calls costs both
processes a gRPC round trip, a few hundred microseconds of CPU on each side whatever it carries,
so a :class:`Coalescer` sends the requests made in the same pass of the loop as one call and
hands each caller its own answer. It never waits for company: a lone request leaves at the end
of the pass it was made in, as it would have, and batches grow only as load does (the dynamic
batching of Triton or Ray Serve, with no queue delay).

How requests travel together is a :class:`Batching`: :func:`embedding` puts the texts of
one-text ``Embed`` requests into one ``Embed`` call (the same text once); :func:`retrieval` and
:func:`rerank` send searches and rerankings as one ``SearchBatch`` or ``RerankBatch`` call, each
answered, or refused, on its own (:mod:`opea_grpc.batch`).

Requests are merged only when their batching gives them the same key, at most ``max_batch`` at
a time. Each caller keeps its own deadline: the merged call gets the latest of them, and a
caller whose deadline passes first fails alone with DEADLINE_EXCEEDED. A caller that goes away
stops waiting; the call is cancelled once nobody waits for it. The call is made in the first
caller's context, so it shows in that request's trace and log.

>>> embed = Coalescer(embedding(EmbeddingClient(channel)), max_batch=32)
>>> reply = await embed(EmbedRequest(input=["What is OPEA?"]), timeout=2.0)
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from opea_grpc import deadline
from opea_grpc.batch import BatchResult, outcomes
from opea_grpc.client import EmbeddingClient, RerankClient, RetrievalClient
from opea_grpc.errors import ServiceError, status_of
from opea_grpc.pb.v1 import embedding_pb2, rerank_pb2, retrieval_pb2

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
#: A caller whose deadline is this close to the merged call's needs no timer of its own (gRPC
#: rounds a deadline it sends up by more: to 10 ms between 1 and 10 s).
_SLACK = 0.001


@dataclass(frozen=True, slots=True)
class Batching(Generic[Req, Resp]):
    """How requests travel: ``key`` (None: never merged), ``one`` call, ``many`` together.

    ``many(requests, timeout)`` returns one outcome per request, in order; it raises when the
    whole call failed.
    """

    key: Callable[[Req], Hashable | None]
    one: Callable[[Req, float], Awaitable[Resp]]
    many: Callable[[list[Req], float], Awaitable[list[Resp | Exception]]]


class _Waiter(Generic[Req, Resp]):
    __slots__ = ("expires", "future", "request", "timer")

    def __init__(self, request: Req, future: asyncio.Future[Resp], expires: float) -> None:
        self.request, self.future, self.expires = request, future, expires
        self.timer: asyncio.TimerHandle | None = None


class _Batch(Generic[Req, Resp]):
    __slots__ = ("task", "waiters")

    def __init__(self) -> None:
        self.waiters: list[_Waiter[Req, Resp]] = []
        self.task: asyncio.Task[None] | None = None


class Coalescer(Generic[Req, Resp]):
    """``call(request, *, timeout)``, merging the calls made in one pass of the event loop.

    ``calls`` counts the calls sent for requests that could be merged, ``requests`` those
    requests: their ratio is the mean batch.
    """

    #: Each caller's deadline is kept here (a timer of its own): no timer is needed around it.
    deadline_bound = True

    def __init__(self, batching: Batching[Req, Resp], *, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.batching = batching
        self.max_batch = max_batch
        self._open: dict[Hashable, _Batch[Req, Resp]] = {}
        self.calls = 0
        self.requests = 0

    async def __call__(self, request: Req, *, timeout: float) -> Resp:
        key = self.batching.key(request)
        if key is None or self.max_batch == 1:
            return await self.batching.one(request, timeout)
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch()
            # The call goes in the first caller's context (its trace, its request id in the
            # callee's log), less its deadline: each caller's is kept by a timer of its own.
            loop.call_soon(self._flush, key, batch, context=contextvars.copy_context())
        waiter: _Waiter[Req, Resp] = _Waiter(
            request, loop.create_future(), time.monotonic() + timeout
        )
        batch.waiters.append(waiter)
        if len(batch.waiters) >= self.max_batch:  # full: the next caller starts another
            del self._open[key]
        try:
            return await waiter.future
        finally:
            if waiter.timer is not None:
                waiter.timer.cancel()
            task = batch.task
            if task is not None and not task.done() and all(w.future.done() for w in batch.waiters):
                task.cancel()  # nobody waits for the call any more

    def _flush(self, key: Hashable, batch: _Batch[Req, Resp]) -> None:
        """End of the pass: send what was asked for in it."""
        if self._open.get(key) is batch:
            del self._open[key]
        waiting = [w for w in batch.waiters if not w.future.done()]
        if not waiting:
            return
        latest = max(w.expires for w in waiting)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for w in waiting:
            if w.expires < latest - _SLACK:
                w.timer = loop.call_later(w.expires - now, _expire, w)
        self.calls += 1
        self.requests += len(waiting)
        batch.waiters = waiting
        deadline.clear()
        batch.task = loop.create_task(self._send(waiting, latest))

    async def _send(self, waiters: list[_Waiter[Req, Resp]], expires: float) -> None:
        seconds = max(0.0, expires - time.monotonic())
        answers: Sequence[Resp | Exception]
        try:
            if len(waiters) == 1:
                answers = [await self.batching.one(waiters[0].request, seconds)]
            else:
                answers = await self.batching.many([w.request for w in waiters], seconds)
        except Exception as exc:  # the call failed: each caller raises it
            answers = [exc] * len(waiters)
        for w, outcome in zip(waiters, answers, strict=True):
            if w.future.done():
                continue
            if isinstance(outcome, Exception):
                w.future.set_exception(outcome)
            else:
                w.future.set_result(outcome)


def _expire(waiter: _Waiter[Any, Any]) -> None:
    if not waiter.future.done():
        waiter.future.set_exception(ServiceError(_DEADLINE, "no reply within the deadline"))


# -- embedding ---------------------------------------------------------------------------------

#: Statuses of a merged ``Embed`` that may be one text's fault: each text is then asked alone,
#: so only its own caller fails, with a message that names its input.
_ONE_TEXTS_FAULT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def embedding(client: EmbeddingClient) -> Batching[embedding_pb2.EmbedRequest,
                                                    embedding_pb2.EmbedResponse]:  # fmt: skip
    """One-text ``Embed`` requests that agree on model, dimensions and user, as one ``Embed``.

    A merged reply carries no ``usage`` (the service counts the tokens of the whole call); a
    request sent alone gets the service's reply as it is.
    """

    def key(request: embedding_pb2.EmbedRequest) -> Hashable | None:
        if len(request.input) != 1:
            return None
        dimensions = request.dimensions if request.HasField("dimensions") else None
        return (request.model, dimensions, request.user)

    def one(
        request: embedding_pb2.EmbedRequest, timeout: float
    ) -> Awaitable[embedding_pb2.EmbedResponse]:
        return client.embed(request, timeout=timeout)

    async def many(
        requests: list[embedding_pb2.EmbedRequest], timeout: float
    ) -> list[embedding_pb2.EmbedResponse | Exception]:
        texts = list(dict.fromkeys(r.input[0] for r in requests))
        merged = embedding_pb2.EmbedRequest()
        merged.CopyFrom(requests[0])
        merged.input[:] = texts
        try:
            reply = await client.embed(merged, timeout=timeout)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            if status_of(exc)[0] not in _ONE_TEXTS_FAULT:
                raise
            return await _each(one, requests, timeout)
        vectors = {item.index: item.embedding for item in reply.data}
        if not all(i in vectors for i in range(len(texts))):
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"the embedding service returned {len(reply.data)} vectors for {len(texts)} inputs",
            )
        position = {text: i for i, text in enumerate(texts)}
        replies: list[embedding_pb2.EmbedResponse | Exception] = []
        for r in requests:
            answer = embedding_pb2.EmbedResponse(model=reply.model)
            answer.data.add(index=0).embedding.extend(vectors[position[r.input[0]]])
            replies.append(answer)
        return replies

    return Batching(key, one, many)


async def _each(
    one: Callable[[Req, float], Awaitable[Resp]], requests: list[Req], timeout: float
) -> list[Resp | Exception]:
    """Each request on its own call, at once; a failure is that request's outcome."""

    async def outcome(request: Req) -> Resp | Exception:
        try:
            return await one(request, timeout)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            return exc

    return list(await asyncio.gather(*(outcome(r) for r in requests)))


# -- batch methods ---------------------------------------------------------------------------


def batched(
    one: Callable[[Req, float], Awaitable[Resp]],
    batch: Callable[[list[Req], float], Awaitable[Sequence[BatchResult]]],
) -> Batching[Req, Resp]:
    """Requests sent together through a batch method (:mod:`opea_grpc.batch`): ``one`` calls the
    single method, ``batch`` the batch method with the requests and returns its results.

    A service that does not serve the batch method (UNIMPLEMENTED: an older version) gets each
    request on its own call from then on.
    """
    serves_batches = True

    def key(request: Req) -> Hashable | None:
        return "" if serves_batches else None

    async def many(requests: list[Req], timeout: float) -> list[Resp | Exception]:
        nonlocal serves_batches
        try:
            results = await batch(requests, timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            serves_batches = False
            return await _each(one, requests, timeout)
        return outcomes(results, len(requests))

    return Batching(key, one, many)


def _through(
    call: Callable[..., Awaitable[Any]], message: Callable[..., Any]
) -> Callable[[list[Any], float], Awaitable[Sequence[BatchResult]]]:
    """The requests as one ``message(requests=...)`` through the batch method ``call``."""

    async def batch(requests: list[Any], timeout: float) -> Sequence[BatchResult]:
        reply = await call(message(requests=requests), timeout=timeout)
        results: Sequence[BatchResult] = reply.results
        return results

    return batch


def retrieval(client: RetrievalClient) -> Batching[retrieval_pb2.SearchRequest,
                                                   retrieval_pb2.SearchResponse]:  # fmt: skip
    """Searches, as one ``SearchBatch``."""
    return batched(
        lambda r, timeout: client.search(r, timeout=timeout),
        _through(client.search_batch, retrieval_pb2.SearchBatchRequest),
    )


def rerank(client: RerankClient) -> Batching[rerank_pb2.RerankRequest,
                                             rerank_pb2.RerankResponse]:  # fmt: skip
    """Rerankings, as one ``RerankBatch``."""
    return batched(
        lambda r, timeout: client.rerank(r, timeout=timeout),
        _through(client.rerank_batch, rerank_pb2.RerankBatchRequest),
    )
