"""A RerankService replica for tests: it answers with its own identity.

``model`` in each response is the replica's name (its pid when served as a process), so a test
can see which replica served a call. Served by ``opea-grpc serve tests.replica:build``.
"""

from __future__ import annotations

import os

import grpc

from opea_grpc import Context
from opea_grpc.batch import RerankBatching
from opea_grpc.config import ServerConfig
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import rerank_pb2, rerank_pb2_grpc
from opea_grpc.server import MicroService, ServiceType


class IdentityReranker(RerankBatching, rerank_pb2_grpc.RerankServiceServicer):
    """Returns the documents in their order, signed with the replica's name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: Context
    ) -> rerank_pb2.RerankResponse:
        if request.query == "":
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "query is empty")
        self.calls += 1
        results = [
            rerank_pb2.RerankResult(index=i, relevance_score=1.0 / (i + 1), document=d)
            for i, d in enumerate(request.documents)
        ]
        return rerank_pb2.RerankResponse(results=results, model=self.name)


def build(config: ServerConfig) -> MicroService:
    name = str(os.getpid())
    service = MicroService(f"replica-{name}", service_type=ServiceType.RERANK, config=config)
    return service.add_service(
        rerank_pb2_grpc.add_RerankServiceServicer_to_server, IdentityReranker(name)
    )
