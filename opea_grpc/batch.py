"""The batch methods of the contracts (``SearchBatch``, ``RerankBatch``), on both sides.

A batch request carries ``requests`` of the method's single form; its response carries one
result per request, in order, each either the ``response`` the single method would have
answered or the ``error`` status it would have refused the request with. One bad request thus
fails only itself, with the message it would have got alone.

A servicer answers one with :func:`answer_each` (or, for a reranker, inherits
:class:`RerankBatching`, which answers each request with its own ``Rerank``); a client reads the
results back with :func:`outcomes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import grpc

from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import common_pb2, rerank_pb2
from opea_grpc.server import Context

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Result = TypeVar("Result")

#: Most requests in one batch call.
MAX_REQUESTS = 256

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class BatchResult(Protocol):
    """A ``SearchBatchResult`` or ``RerankBatchResult``: ``oneof outcome {response, error}``."""

    @property
    def response(self) -> Any: ...

    @property
    def error(self) -> common_pb2.Status: ...

    def WhichOneof(
        self, oneof_group: Literal["outcome"]
    ) -> Literal["response", "error"] | None: ...


async def answer_each(
    requests: Sequence[Req],
    answer: Callable[[Req], Awaitable[Resp]],
    result: Callable[..., Result],
    *,
    limit: int = MAX_REQUESTS,
) -> list[Result]:
    """``result(response=...)`` or ``result(error=...)`` for each request, answered at once.

    ``answer`` is the single method's logic, raising :class:`ServiceError` to refuse. An empty
    or oversized batch is refused whole (INVALID_ARGUMENT).
    """
    if not requests:
        raise ServiceError(_INVALID, "requests is empty: send at least one request")
    if len(requests) > limit:
        raise ServiceError(
            _INVALID,
            f"{len(requests)} requests in one batch; the limit is {limit}: split them into"
            " several batches",
        )

    async def each(request: Req) -> Result:
        try:
            return result(response=await answer(request))
        except ServiceError as exc:
            return result(error=common_pb2.Status(code=exc.code.value[0], message=exc.message))

    if len(requests) == 1:
        return [await each(requests[0])]
    return list(await asyncio.gather(*(each(request) for request in requests)))


def outcomes(results: Sequence[BatchResult], count: int) -> list[Any]:
    """Each result's response, or the :class:`ServiceError` its error stands for."""
    if len(results) != count:
        raise ServiceError(
            grpc.StatusCode.INTERNAL, f"a batch of {count} requests got {len(results)} results"
        )
    return [
        ServiceError(_CODES.get(r.error.code, grpc.StatusCode.UNKNOWN), r.error.message)
        if r.WhichOneof("outcome") == "error"
        else r.response
        for r in results
    ]


class _Reranker(Protocol):
    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: Context
    ) -> rerank_pb2.RerankResponse: ...


class RerankBatching:
    """Mixin for a ``RerankService`` servicer: ``RerankBatch`` answers each request with the
    servicer's own ``Rerank``.

    >>> class MyReranker(RerankBatching, rerank_pb2_grpc.RerankServiceServicer):
    ...     async def Rerank(self, request, context): ...
    """

    async def RerankBatch(
        self: _Reranker, request: rerank_pb2.RerankBatchRequest, context: Context
    ) -> rerank_pb2.RerankBatchResponse:
        results = await answer_each(
            request.requests, lambda r: self.Rerank(r, context), rerank_pb2.RerankBatchResult
        )
        return rerank_pb2.RerankBatchResponse(results=results)
