"""The benchmark's trivial services (bench/trivial.py) keep the real contracts, so the figures
bench/pipeline.py prints come from a pipeline the gateway could really run."""

from __future__ import annotations

import importlib

import grpc
import pytest

from opea_grpc.client import ChatClient, EmbeddingClient, ModelClient, RerankClient, RetrievalClient
from opea_grpc.config import ServerConfig
from opea_grpc.pb.v1 import chat_pb2, common_pb2, embedding_pb2, rerank_pb2, retrieval_pb2
from opea_grpc.testing import started
from tests.processes import health, served

# Imported by name: bench/ is a directory of scripts, not a package, and mypy checks
# bench/trivial.py as the module "trivial"; a static import would make it "bench.trivial" too.
trivial = importlib.import_module("bench.trivial")

LOOPBACK = ServerConfig(host="127.0.0.1", port=0)


def question(text: str = "What is gRPC?") -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        model=trivial.CHAT_MODEL,
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content=text)],
        documents=[common_pb2.Document(id="d", text="gRPC is a remote procedure call system.")],
    )


async def test_embedding_returns_one_fixed_vector_per_input() -> None:
    async with started(trivial.embedding(LOOPBACK)) as channel:
        response = await EmbeddingClient(channel).embed(
            embedding_pb2.EmbedRequest(input=["one", "two words"])
        )
        models = await ModelClient(channel).list_models()
    assert [e.index for e in response.data] == [0, 1]
    assert all(len(e.embedding) == trivial.DIMENSIONS for e in response.data)
    assert response.data[0].embedding == response.data[1].embedding
    assert response.model == trivial.EMBEDDING_MODEL
    assert response.usage.prompt_tokens == 3
    assert [(m.id, m.kind, m.dimensions) for m in models.models] == [
        (trivial.EMBEDDING_MODEL, common_pb2.MODEL_KIND_EMBEDDING, trivial.DIMENSIONS)
    ]


async def test_retrieval_finds_three_documents_and_accepts_writes() -> None:
    async with started(trivial.retrieval(LOOPBACK)) as channel:
        client = RetrievalClient(channel)
        found = await client.search(
            retrieval_pb2.SearchRequest(vector=[0.1] * trivial.DIMENSIONS, query="q", top_k=10)
        )
        upserted = await client.upsert(
            retrieval_pb2.UpsertRequest(
                documents=[common_pb2.Document(id="x", text="t", embedding=[1.0, 0.0])]
            )
        )
        deleted = await client.delete(retrieval_pb2.DeleteRequest(ids=["x", "y"]))
        collections = await client.list_collections()
        await client.delete_collection("default")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.search(retrieval_pb2.SearchRequest(top_k=3))
    assert [d.document.id for d in found.documents] == ["doc-1", "doc-2", "doc-3"]
    assert all(d.document.text for d in found.documents)
    assert found.documents[0].document.metadata["source"] == "a.md"
    assert (upserted.upserted_count, deleted.deleted_count) == (1, 2)
    assert [(c.name, c.dimensions) for c in collections.collections] == [
        ("default", trivial.DIMENSIONS)
    ]
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # the real checks still run


async def test_rerank_keeps_the_top_one() -> None:
    docs = [common_pb2.Document(id=f"d{i}", text=f"passage {i}") for i in range(3)]
    async with started(trivial.rerank(LOOPBACK)) as channel:
        response = await RerankClient(channel).rerank(
            rerank_pb2.RerankRequest(query="which?", documents=docs, top_n=3)
        )
        models = await ModelClient(channel).list_models()
    assert [(r.index, r.document.id) for r in response.results] == [(0, "d0")]
    assert response.model == trivial.RERANK_MODEL
    assert [m.kind for m in models.models] == [common_pb2.MODEL_KIND_RERANK]


async def test_chat_answers_32_tokens_whole_and_one_message_per_token_streamed() -> None:
    async with started(trivial.chat(LOOPBACK)) as channel:
        client = ChatClient(channel)
        whole = await client.chat(question())
        chunks = [c async for c in client.chat_stream(question())]
        models = await ModelClient(channel).list_models()
    assert whole.message.content == trivial.ANSWER
    assert whole.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert whole.usage.completion_tokens == len(trivial.ANSWER_TOKENS) == 32
    tokens, last = chunks[:-1], chunks[-1]
    assert [c.content for c in tokens] == list(trivial.ANSWER_TOKENS)
    assert tokens[0].role == chat_pb2.ROLE_ASSISTANT
    assert [c.finish_reason for c in tokens[-2:]] == [
        chat_pb2.FINISH_REASON_UNSPECIFIED,
        chat_pb2.FINISH_REASON_STOP,
    ]
    assert last.usage.completion_tokens == 32
    assert last.usage.prompt_tokens > 0
    assert not last.content
    assert [(m.id, m.kind) for m in models.models] == [
        (trivial.CHAT_MODEL, common_pb2.MODEL_KIND_CHAT)
    ]


async def test_served_by_the_cli_as_module_attr(subprocess_env: dict[str, str]) -> None:
    argv = ("-m", "opea_grpc", "serve", "bench.trivial:chat", "--port", "0")
    async with served(subprocess_env, *argv) as child:
        result = await health(subprocess_env, child.target, ChatClient.SERVICE)
        assert result.code == 0, result.err
        assert await child.stop() == 0
