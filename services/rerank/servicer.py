"""``opea.v1.RerankService``: checks the request, asks the backend, answers in proto."""

from __future__ import annotations

import grpc

from opea_grpc import Context
from opea_grpc.batch import answer_each
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc
from services.rerank.backend import Reranker

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    """Validates a RerankRequest and returns the backend's ranking with the documents."""

    def __init__(self, backend: Reranker, *, max_documents: int) -> None:
        self._backend = backend
        self._max_documents = max_documents

    def _check(self, request: rerank_pb2.RerankRequest) -> None:
        model = self._backend.model
        if request.model and request.model != model:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here; this service serves {model!r} "
                "(or leave model empty)",
            )
        if not request.query.strip():
            raise ServiceError(_INVALID, "query is empty: send the text to rank documents for")
        count = len(request.documents)
        if count == 0:
            raise ServiceError(_INVALID, "documents is empty: send the candidates to rank")
        if count > self._max_documents:
            raise ServiceError(
                _INVALID,
                f"documents: {count} given, at most {self._max_documents} allowed per request "
                "(OPEA_RERANK_MAX_DOCUMENTS); split the candidates or raise the limit",
            )
        for i, document in enumerate(request.documents):
            if not document.text.strip():
                raise ServiceError(
                    _INVALID, f"documents[{i}].text is empty: every candidate needs its text"
                )
        if request.HasField("top_n") and request.top_n < 1:
            raise ServiceError(
                _INVALID, f"top_n must be >= 1, got {request.top_n}; leave it unset to keep all"
            )

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: Context
    ) -> rerank_pb2.RerankResponse:
        return await self._rerank(request)

    async def RerankBatch(
        self, request: rerank_pb2.RerankBatchRequest, context: Context
    ) -> rerank_pb2.RerankBatchResponse:
        results = await answer_each(request.requests, self._rerank, rerank_pb2.RerankBatchResult)
        return rerank_pb2.RerankBatchResponse(results=results)

    async def _rerank(self, request: rerank_pb2.RerankRequest) -> rerank_pb2.RerankResponse:
        self._check(request)
        documents = request.documents
        top_n = min(request.top_n, len(documents)) if request.HasField("top_n") else None
        ranking = await self._backend.rerank(request.query, [d.text for d in documents], top_n)
        return rerank_pb2.RerankResponse(
            results=[
                rerank_pb2.RerankResult(
                    index=r.index, relevance_score=r.score, document=documents[r.index]
                )
                for r in ranking.results
            ],
            model=self._backend.model,
            usage=common_pb2.Usage(prompt_tokens=ranking.tokens, total_tokens=ranking.tokens),
        )
