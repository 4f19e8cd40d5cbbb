"""Concurrent one-text embedding calls merged into one ``Embed`` call (dynamic batching).

Under load many requests reach the same step at once: the gateway parses a burst of HTTP
requests in one pass of the event loop, and each then asks the embedding service for the vector
of its own question. Each of those calls costs both processes a gRPC round trip (a few hundred
microseconds of CPU on each side, whatever the text), so the :class:`EmbedCoalescer` sends the
texts asked for in the same pass of the loop as one ``Embed`` call and hands each caller its
vector. It never waits for company: a lone call leaves at the end of the pass it was made in, so
latency at low load is unchanged, and batches grow only as load does (as in the dynamic batchers
of Triton or Ray Serve, with no queue delay). The embedding service batches its model's work
itself; this saves the calls.

Calls are merged only when they agree on everything but the text (model, dimensions, user), and
at most ``max_inputs`` texts go in one call; the same text asked twice is sent once. Each caller
keeps its own deadline: the merged call gets the latest of them, and a caller whose deadline
passes first fails alone with DEADLINE_EXCEEDED. A caller that goes away stops waiting; the call
is cancelled once nobody waits for it. When a merged call fails with a status that may be one
text's fault (INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION), each text is asked for again
on its own, so one bad text fails only its own caller and the message names the right input.
The call is made in the first caller's context: it shows in that request's trace and log. A
merged reply carries no ``usage`` (the service counts the tokens of the whole call); a caller
whose call was not merged gets the service's reply as it is.

>>> embed = EmbedCoalescer(EmbeddingClient(channel).embed, max_inputs=32)
>>> reply = await embed(EmbedRequest(input=["What is OPEA?"]), timeout=2.0)
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable

import grpc

from opea_grpc import deadline
from opea_grpc.errors import ServiceError, status_of
from opea_grpc.pb.v1 import embedding_pb2

Embed = Callable[..., Awaitable[embedding_pb2.EmbedResponse]]

#: Statuses of a merged call that may be one text's fault: each text is then asked alone.
_ALONE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

Key = tuple[str, int | None, str]


class _Waiter:
    __slots__ = ("expires", "future", "text", "timer")

    def __init__(
        self, text: str, future: asyncio.Future[embedding_pb2.EmbedResponse], expires: float
    ) -> None:
        self.text, self.future, self.expires = text, future, expires
        self.timer: asyncio.TimerHandle | None = None


class _Batch:
    __slots__ = ("request", "task", "waiters")

    def __init__(self, request: embedding_pb2.EmbedRequest) -> None:
        self.request = request  # the first caller's: model, dimensions, user
        self.waiters: list[_Waiter] = []
        self.task: asyncio.Task[None] | None = None


class EmbedCoalescer:
    """``embed(request, *, timeout)`` for one-text requests, merging concurrent ones.

    ``embed`` is the call to make (an :class:`~opea_grpc.client.EmbeddingClient`'s ``embed``).
    A request with other than one text goes straight through. ``calls`` counts the ``Embed``
    calls made for one-text requests (a text asked again alone included), ``requests`` those
    requests: their ratio is the mean batch.
    """

    #: Each caller's deadline is kept here (timers of its own): no timer is needed around it.
    deadline_bound = True

    def __init__(self, embed: Embed, *, max_inputs: int = 32) -> None:
        if max_inputs < 1:
            raise ValueError("max_inputs must be >= 1")
        self._embed = embed
        self.max_inputs = max_inputs
        self._open: dict[Key, _Batch] = {}
        self.calls = 0
        self.requests = 0

    async def __call__(
        self, request: embedding_pb2.EmbedRequest, *, timeout: float
    ) -> embedding_pb2.EmbedResponse:
        if len(request.input) != 1 or self.max_inputs == 1:
            return await self._embed(request, timeout=timeout)
        loop = asyncio.get_running_loop()
        key: Key = (
            request.model,
            request.dimensions if request.HasField("dimensions") else None,
            request.user,
        )
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(request)
            # The call goes in the first caller's context (its trace, its request id in the
            # callee's log), less its deadline: each caller's is kept by a timer of its own.
            loop.call_soon(self._flush, key, batch, context=contextvars.copy_context())
        waiter = _Waiter(request.input[0], loop.create_future(), time.monotonic() + timeout)
        batch.waiters.append(waiter)
        if len(batch.waiters) >= self.max_inputs:  # full: the next caller starts another
            del self._open[key]
        try:
            return await waiter.future
        finally:
            if waiter.timer is not None:
                waiter.timer.cancel()
            task = batch.task
            if task is not None and not task.done() and all(w.future.done() for w in batch.waiters):
                task.cancel()  # nobody waits for the call any more

    def _flush(self, key: Key, batch: _Batch) -> None:
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
            if w.expires < latest:
                w.timer = loop.call_later(w.expires - now, _expire, w)
        self.calls += 1
        self.requests += len(waiting)
        batch.waiters = waiting
        deadline.clear()
        batch.task = loop.create_task(self._send(batch, latest))

    async def _send(self, batch: _Batch, expires: float) -> None:
        waiters = batch.waiters
        if len(waiters) == 1:
            self._settle(waiters, await self._call_alone(batch.request, waiters[0], expires))
            return
        texts = list(dict.fromkeys(w.text for w in waiters))
        request = embedding_pb2.EmbedRequest()
        request.CopyFrom(batch.request)
        request.input[:] = texts
        try:
            reply = await self._embed(request, timeout=max(0.0, expires - time.monotonic()))
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            if status_of(exc)[0] not in _ALONE:
                self._settle(waiters, exc)
                return
            await asyncio.gather(*(self._alone(batch.request, w) for w in waiters))
            return
        vectors = {item.index: item.embedding for item in reply.data}
        if not all(position in vectors for position in range(len(texts))):
            self._settle(waiters, ServiceError(
                grpc.StatusCode.INTERNAL,
                f"the embedding service returned {len(reply.data)} vectors for"
                f" {len(texts)} inputs",
            ))  # fmt: skip
            return
        index = {text: position for position, text in enumerate(texts)}
        for w in waiters:
            if not w.future.done():
                one = embedding_pb2.EmbedResponse(model=reply.model)
                one.data.add(index=0).embedding.extend(vectors[index[w.text]])
                w.future.set_result(one)

    async def _alone(self, first: embedding_pb2.EmbedRequest, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self.calls += 1
        self._settle([waiter], await self._call_alone(first, waiter, waiter.expires))

    async def _call_alone(
        self, first: embedding_pb2.EmbedRequest, waiter: _Waiter, expires: float
    ) -> embedding_pb2.EmbedResponse | BaseException:
        request = first
        if first.input[0] != waiter.text:
            request = embedding_pb2.EmbedRequest()
            request.CopyFrom(first)
            request.input[:] = [waiter.text]
        try:
            return await self._embed(request, timeout=max(0.0, expires - time.monotonic()))
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            return exc

    @staticmethod
    def _settle(
        waiters: list[_Waiter], outcome: embedding_pb2.EmbedResponse | BaseException
    ) -> None:
        for w in waiters:
            if w.future.done():
                continue
            if isinstance(outcome, BaseException):
                w.future.set_exception(outcome)
            else:
                w.future.set_result(outcome)


def _expire(waiter: _Waiter) -> None:
    if not waiter.future.done():
        waiter.future.set_exception(
            ServiceError(_DEADLINE, "no embedding within the request's deadline")
        )
