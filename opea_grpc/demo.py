"""The README's example: a microservice in about 20 lines and a 3-node pipeline over it.

opea-grpc demo           serve the microservice, run the pipeline once, keep serving
opea-grpc demo --once    run the pipeline once and exit
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import grpc

from opea_grpc import (
    Channels,
    Context,
    MicroService,
    Node,
    ServerConfig,
    ServiceError,
    ServiceOrchestrator,
    ServiceType,
)
from opea_grpc.batch import RerankBatching
from opea_grpc.client import RerankClient
from opea_grpc.pb.v1 import chat_pb2, common_pb2, rerank_pb2, rerank_pb2_grpc, retrieval_pb2


# -- a microservice ------------------------------------------------------------------------------
class OverlapReranker(RerankBatching, rerank_pb2_grpc.RerankServiceServicer):
    """Ranks documents by how many words they share with the query (``RerankBatch`` too: each
    request of a batch by ``Rerank``)."""

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: Context
    ) -> rerank_pb2.RerankResponse:
        if not request.query.strip():
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "query is empty")
        words = set(request.query.lower().split())
        scores = [len(words & set(d.text.lower().split())) for d in request.documents]
        keep = request.top_n if request.HasField("top_n") else len(scores)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:keep]
        results = [
            rerank_pb2.RerankResult(
                index=i, relevance_score=scores[i], document=request.documents[i]
            )
            for i in ranked
        ]
        return rerank_pb2.RerankResponse(model="word-overlap", results=results)


def build(config: ServerConfig | None = None) -> MicroService:
    service = MicroService("overlap-rerank", service_type=ServiceType.RERANK, config=config)
    return service.add_service(
        rerank_pb2_grpc.add_RerankServiceServicer_to_server, OverlapReranker()
    )


# -- a 3-node pipeline: retrieve (in process) -> rerank (gRPC) -> answer (in process) --------
PASSAGES = [
    "gRPC carries typed protobuf messages over HTTP/2.",
    "Server reflection lets grpcurl discover services and methods at run time.",
    "Bananas are rich in potassium.",
]


@dataclass
class Question:
    text: str


async def retrieve(question: Question, *, timeout: float) -> retrieval_pb2.SearchResponse:
    docs = [common_pb2.Document(id=str(i), text=text) for i, text in enumerate(PASSAGES)]
    return retrieval_pb2.SearchResponse(
        documents=[common_pb2.ScoredDocument(document=d) for d in docs]
    )


def rerank_request(question: Question, done: Mapping[str, object]) -> rerank_pb2.RerankRequest:
    found = cast(retrieval_pb2.SearchResponse, done["retrieve"])
    docs = [d.document for d in found.documents]
    return rerank_pb2.RerankRequest(query=question.text, documents=docs, top_n=1)


async def answer(request: chat_pb2.ChatRequest, *, timeout: float) -> chat_pb2.ChatResponse:
    text = f"{request.documents[0].text} [1]" if request.documents else "I found nothing."
    message = chat_pb2.ChatMessage(role=chat_pb2.ROLE_ASSISTANT, content=text)
    return chat_pb2.ChatResponse(message=message)


def pipeline(reranker: RerankClient) -> ServiceOrchestrator[Question]:
    return (
        ServiceOrchestrator[Question]()
        .add(Node("retrieve", retrieve))
        .add(Node("rerank", reranker.rerank, prepare=rerank_request, timeout=2.0))
        .add(Node("answer", answer))
        .flow_to("retrieve", "rerank")
        .flow_to("rerank", "answer")  # RerankResponse -> ChatRequest: a built-in adapter
    )


# -- running it ---------------------------------------------------------------------------------
def graph() -> ServiceOrchestrator[Question]:
    """The pipeline's shape (``opea-grpc graph opea_grpc.demo:graph``); connects nowhere."""
    return pipeline(RerankClient(grpc.aio.insecure_channel("127.0.0.1:50053")))


async def main(config: ServerConfig, *, once: bool, stop: asyncio.Event | None = None) -> str:
    """Serve the reranker, ask the pipeline one question, print what happened."""
    async with build(config) as service:
        channels = Channels()
        try:
            reranker = RerankClient(channels.get(service.target, [RerankClient.SERVICE]))
            question = Question("how does grpcurl discover services")
            result = await pipeline(reranker).run(question, state=question, timeout=5.0)
        finally:
            await channels.close()
        reply = cast(chat_pb2.ChatResponse, result.outputs["answer"])
        print(f"Q: {question.text}\nA: {reply.message.content}\n")
        for t in result.timings:
            print(f"  {t.name:<9} {t.status.name:<9} {t.duration * 1000:7.2f} ms")
        print(f"\n{pipeline(reranker).describe('mermaid')}\n")
        if once:
            return reply.message.content
        target = service.target
        print(
            f"overlap-rerank serving on {target}; try:\n"
            f"  opea-grpc health {target}\n"
            f"  buf curl --protocol grpc --http2-prior-knowledge --list-methods http://{target}\n"
            f'  grpcurl -plaintext -d \'{{"query": "grpc", "documents": '
            f'[{{"text": "grpc over http2"}}]}}\' {target} opea.v1.RerankService/Rerank\n'
            "Ctrl-C stops.",
            flush=True,
        )
        await (stop or asyncio.Event()).wait()
    return reply.message.content
