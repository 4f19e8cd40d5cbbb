"""The gateway's REST routes beyond the SDK: errors, knowledge base, cache, operations, gRPC."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from opea_grpc.channel import connect
from opea_grpc.client import ChatQnAClient, ModelClient
from opea_grpc.pb.v1 import chat_pb2, chatqna_pb2
from opea_grpc.server import MicroService
from tests.gateway.conftest import Stack, default_services, running
from tests.gateway.test_openai_sdk import ingest

QUESTION = "Which fruit is rich in potassium?"
ASK = {"model": "extractive-answerer", "messages": [{"role": "user", "content": QUESTION}]}


def error_of(reply: httpx.Response) -> dict[str, object]:
    body = reply.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_malformed_json_is_400(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        reply = await http.post(
            "/v1/chat/completions",
            content=b'{"model": "x", "messages": [',
            headers={"content-type": "application/json"},
        )
        assert reply.status_code == 400
        assert "not valid JSON" in str(error_of(reply)["message"])
        reply = await http.post("/v1/chat/completions", json=[1, 2])
        assert reply.status_code == 400
        assert "JSON object" in str(error_of(reply)["message"])


async def test_oversize_body_is_413(tmp_path: Path) -> None:
    async with (
        running(default_services(tmp_path), max_body_bytes=4096) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        big = {**ASK, "messages": [{"role": "user", "content": "x" * 10_000}]}
        reply = await http.post("/v1/chat/completions", json=big)
        assert reply.status_code == 413
        assert "4096 bytes" in str(error_of(reply)["message"])

        async def chunked() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        reply = await http.post(
            "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        assert reply.status_code == 413


async def test_unknown_route_and_method_are_openai_shaped(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        missing = await http.get("/v1/nothing-here")
        wrong = await http.get("/v1/chat/completions")
    assert missing.status_code == 404
    assert "no route GET /v1/nothing-here" in str(error_of(missing)["message"])
    assert wrong.status_code == 405
    error_of(wrong)


async def test_ingest_search_delete_and_collections(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        text = " ".join(f"Sentence {i} talks about potassium and bananas." for i in range(40))
        reply = await http.post(
            "/v1/ingest",
            json={
                "collection": "notes",
                "documents": [{"id": "long.md", "text": text, "metadata": {"lang": "en"}}],
                "chunk_size": 300,
                "chunk_overlap": 50,
            },
        )
        assert reply.status_code == 200, reply.text
        first = reply.json()
        assert first["chunks"] > 3
        assert first["ids"][0] == "long.md#0"
        found = (
            await http.post(
                "/v1/search", json={"collection": "notes", "query": "potassium", "top_k": 100}
            )
        ).json()["data"]
        assert len(found) == first["chunks"]
        assert found[0]["metadata"]["lang"] == "en"
        # ingesting a shorter version replaces the document: no stale chunk is left
        reply = await http.post(
            "/v1/ingest",
            json={"collection": "notes", "documents": [{"id": "long.md", "text": "Short now."}]},
        )
        assert reply.json()["chunks"] == 1
        found = (
            await http.post(
                "/v1/search", json={"collection": "notes", "query": "short", "top_k": 100}
            )
        ).json()["data"]
        assert [hit["id"] for hit in found] == ["long.md#0"]
        listed = (await http.get("/v1/collections")).json()["data"]
        assert {"name": "notes", "dimensions": 384, "document_count": 1} in listed
        deleted = await http.post(
            "/v1/documents/delete", json={"collection": "notes", "sources": ["long.md"]}
        )
        assert deleted.json() == {"deleted": 1}
        nothing = await http.post("/v1/documents/delete", json={"collection": "notes"})
        assert nothing.status_code == 400
        assert (await http.delete("/v1/collections/notes")).status_code == 204
        gone = await http.post("/v1/search", json={"collection": "notes", "query": "short"})
        assert gone.status_code == 404
        error_of(gone)


async def test_cache_hits_and_a_write_invalidates_cached_searches(stack: Stack) -> None:
    await ingest(stack)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        question = {**ASK, "messages": [{"role": "user", "content": "What colour are plums?"}]}
        before = (await http.post("/v1/chat/completions", json=question)).json()
        again = (await http.post("/v1/chat/completions", json=question)).json()
        assert again["opea"]["sources"] == before["opea"]["sources"]
        metrics = (await http.get("/metrics")).text
        assert 'opea_gateway_cache_hits_total{node="retrieve"} 1.0' in metrics
        assert 'opea_gateway_cache_hits_total{node="embed"} 1.0' in metrics
        await http.post(
            "/v1/ingest", json={"documents": [{"id": "plums.md", "text": "Plums are purple."}]}
        )
        after = (await http.post("/v1/chat/completions", json=question)).json()
        assert after["opea"]["sources"][0]["id"] == "plums.md#0"  # not the stale result
        bypass = {**question, "opea": {"cache": False}}
        await http.post("/v1/chat/completions", json=bypass)
        metrics = (await http.get("/metrics")).text
        assert 'opea_gateway_cache_hits_total{node="retrieve"} 1.0' in metrics


async def test_opea_chatqna_shape_streams_by_default(stack: Stack) -> None:
    await ingest(stack)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        async with http.stream(
            "POST", "/v1/chatqna", json={"messages": "Which fruit is rich in potassium?"}
        ) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert "potassium" in text
        whole = await http.post(
            "/v1/chatqna", json={"messages": "Which fruit is rich in potassium?", "stream": False}
        )
        assert whole.json()["object"] == "chat.completion"


async def test_liveness_readiness_and_metrics(tmp_path: Path) -> None:
    services = default_services(tmp_path)
    async with running(services) as stack, httpx.AsyncClient(base_url=stack.url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/v1/health_check")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        await http.post("/v1/chat/completions", json={**ASK, "model": "nope"})
        metrics = (await http.get("/metrics")).text
        assert 'opea_gateway_requests_total{route="/v1/chat/completions",status="404"}' in metrics
        assert 'opea_gateway_in_flight{route="/v1/chat/completions"} 0.0' in metrics
        await services["chat"].stop(0)
        for _ in range(200):  # the channel notices the closed connection on its own
            ready = await http.get("/readyz")
            if ready.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert ready.status_code == 503
        assert ready.json()["detail"]["chat"] != "READY"
        down = await http.post("/v1/chat/completions", json={**ASK, "opea": {"retrieval": False}})
        assert down.status_code in (404, 503)  # the model list cannot be refreshed, or chat fails


async def test_openapi_documents_routes_and_their_errors(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        spec = (await http.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/rerank"):
        assert path in paths
    responses = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "429", "503", "504"} <= set(responses)
    assert "ErrorResponse" in json.dumps(responses["503"])


# -- the gRPC face -----------------------------------------------------------------------------


async def test_grpc_face_asks_and_streams(stack: Stack) -> None:
    await ingest(stack)
    gateway: MicroService = stack.gateway
    channel = connect(gateway.target, [ChatQnAClient.SERVICE, ModelClient.SERVICE])
    try:
        client = ChatQnAClient(channel)
        message = chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content=QUESTION)
        request = chatqna_pb2.AskRequest(chat=chat_pb2.ChatRequest(messages=[message]))
        answer = await client.ask(request, timeout=10)
        assert "potassium" in answer.chat.message.content
        assert answer.sources[0].document.id == "fruit.md#0"
        assert [n.name for n in answer.nodes] == ["embed", "retrieve", "rerank", "chat"]
        chunks = [c async for c in client.ask_stream(request, timeout=10)]
        assert chunks[0].sources[0].document.id == "fruit.md#0"
        assert "potassium" in "".join(c.chunk.content for c in chunks)
        assert [n.name for n in chunks[-1].nodes][-1] == "chat"
        listed = await ModelClient(channel).list_models()
        assert {"extractive-answerer", "bm25-rrf"} <= {m.id for m in listed.models}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.ask(chatqna_pb2.AskRequest(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "messages is empty" in (caught.value.details() or "")
    finally:
        await channel.close(None)


async def test_grpc_face_serves_health_and_reflection(stack: Stack, buf: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        buf,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--list-methods",
        f"http://{stack.gateway.target}",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert "opea.v1.ChatQnAService/Ask" in out.decode()
    assert "grpc.health.v1.Health/Check" in out.decode()


async def test_request_id_is_echoed_or_made(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        given = await http.get("/healthz", headers={"x-request-id": "trace-me-42"})
        made = await http.get("/healthz")
        missing = await http.get("/v1/nothing")
    assert given.headers["x-request-id"] == "trace-me-42"
    assert len(made.headers["x-request-id"]) == 32
    assert missing.headers["x-request-id"] != made.headers["x-request-id"]


async def test_cors_is_closed_unless_origins_are_configured(tmp_path: Path) -> None:
    origin = {"origin": "https://app.example.com", "access-control-request-method": "POST"}
    async with running(default_services(tmp_path / "closed")) as closed:
        async with httpx.AsyncClient(base_url=closed.url) as http:
            reply = await http.options("/v1/chat/completions", headers=origin)
        assert "access-control-allow-origin" not in reply.headers
    async with running(
        default_services(tmp_path / "open"), cors_origins=("https://app.example.com",)
    ) as opened:
        async with httpx.AsyncClient(base_url=opened.url) as http:
            preflight = await http.options("/v1/chat/completions", headers=origin)
            other = await http.options(
                "/v1/chat/completions", headers={**origin, "origin": "https://evil.example"}
            )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "access-control-allow-origin" not in other.headers
