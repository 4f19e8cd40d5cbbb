"""API keys with scopes: REST through the openai SDK and raw HTTP, and the gRPC face."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway.auth import KeyRing
from opea_grpc.channel import connect
from opea_grpc.client import ChatQnAClient
from opea_grpc.config import ConfigError
from opea_grpc.keys import digest
from opea_grpc.pb.v1 import chat_pb2, chatqna_pb2
from opea_grpc.testing import wait_for_serving
from tests.gateway.conftest import Stack, default_services, running

READER, WRITER = "og-reader-key", "og-writer-key"
QUESTION = [{"role": "user", "content": "Which fruit is rich in potassium?"}]


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Stack]:
    keys = tmp_path / "keys"
    keys.write_text(
        f"# test keys\n{digest(READER)} chat,embeddings reader\n"
        f"{digest(WRITER)} ingest,chat,admin writer\n"
    )
    async with running(
        default_services(tmp_path / "data"), api_keys_file=str(keys), metrics_auth=True
    ) as stack:
        yield stack


def sdk(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.api, api_key=key, max_retries=0)


async def test_missing_or_wrong_key_is_401(guarded: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        await sdk(guarded, "og-nope").chat.completions.create(
            model="extractive-answerer",
            messages=QUESTION,  # type: ignore[arg-type]
        )
    assert wrong.value.code == "invalid_api_key"
    async with httpx.AsyncClient(base_url=guarded.url) as http:
        missing = await http.post("/v1/chat/completions", json={})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in missing.json()["error"]["message"]


async def test_a_key_without_the_scope_is_403(guarded: Stack) -> None:
    docs = {"documents": [{"id": "a.md", "text": "Bananas are rich in potassium."}]}
    async with httpx.AsyncClient(base_url=guarded.url) as http:
        headers = {"authorization": f"Bearer {READER}"}
        refused = await http.post("/v1/ingest", json=docs, headers=headers)
        assert refused.status_code == 403
        assert "may not use 'ingest'" in refused.json()["error"]["message"]
        assert (await http.get("/metrics", headers=headers)).status_code == 403
        writer = {"authorization": f"Bearer {WRITER}"}
        assert (await http.post("/v1/ingest", json=docs, headers=writer)).status_code == 200
        assert (await http.get("/metrics", headers=writer)).status_code == 200
        assert (await http.get("/healthz")).status_code == 200  # health stays open
        assert (await http.get("/openapi.json")).status_code == 200
    reader = sdk(guarded, READER)
    answer = await reader.chat.completions.create(
        model="extractive-answerer",
        messages=QUESTION,  # type: ignore[arg-type]
    )
    assert "potassium" in (answer.choices[0].message.content or "")
    with pytest.raises(openai.PermissionDeniedError):
        await reader.post("/rerank", body={"query": "q", "documents": ["d"]}, cast_to=object)


async def test_grpc_face_needs_a_key_with_the_chat_scope(guarded: Stack) -> None:
    channel = connect(guarded.gateway.target, [ChatQnAClient.SERVICE])
    try:
        await wait_for_serving(channel)  # health stays open
        client = ChatQnAClient(channel)
        message = chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="potassium?")
        request = chatqna_pb2.AskRequest(
            chat=chat_pb2.ChatRequest(messages=[message]),
            rag=chatqna_pb2.RagOptions(disable_retrieval=True),
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.ask(request, timeout=10)
        assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in client.ask_stream(request, timeout=10):
                pass
        assert streamed.value.code() is grpc.StatusCode.UNAUTHENTICATED
        reply = await client.ask(
            request, timeout=10, metadata=(("authorization", f"Bearer {READER}"),)
        )
        assert reply.chat.message.content
    finally:
        await channel.close(None)


def test_keys_file_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.write_text(f"{digest('k')} chat,root\n")
    with pytest.raises(ConfigError, match="unknown scope 'root'"):
        KeyRing.from_file(str(bad))
    bad.write_text("plaintext-key chat\n")
    with pytest.raises(ConfigError, match="sha256"):
        KeyRing.from_file(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        KeyRing.from_file(str(tmp_path / "missing"))


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Stack]:
    keys = tmp_path / "keys"
    keys.write_text(f"{digest(READER)} chat reader\n{digest(WRITER)} admin writer\n")
    async with running(
        default_services(tmp_path / "data"), api_keys_file=str(keys), rate_rpm=3
    ) as stack:
        yield stack


async def test_over_the_rate_limit_is_429_with_retry_after(limited: Stack) -> None:
    reader = sdk(limited, READER)
    for _ in range(3):  # under the budget nothing is refused
        await reader.chat.completions.create(
            model="extractive-answerer",
            messages=QUESTION,  # type: ignore[arg-type]
            extra_body={"opea": {"retrieval": False}},
        )
    with pytest.raises(openai.RateLimitError) as refused:
        await reader.chat.completions.create(
            model="extractive-answerer",
            messages=QUESTION,  # type: ignore[arg-type]
        )
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    models = await sdk(limited, WRITER).models.list()  # another key, another budget
    assert models.data


async def test_over_the_rate_limit_over_grpc_carries_retry_info(limited: Stack) -> None:
    channel = connect(limited.gateway.target, [ChatQnAClient.SERVICE])
    key = (("authorization", f"Bearer {READER}"),)
    message = chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="potassium?")
    request = chatqna_pb2.AskRequest(
        chat=chat_pb2.ChatRequest(messages=[message]),
        rag=chatqna_pb2.RagOptions(disable_retrieval=True),
    )
    try:
        client = ChatQnAClient(channel)
        for _ in range(3):
            await client.ask(request, timeout=10, metadata=key)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.ask(request, timeout=10, metadata=key)
    finally:
        await channel.close(None)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers: list[tuple[str, str | bytes]] = list(refused.value.trailing_metadata() or ())  # type: ignore[arg-type]
    details = next(value for key, value in trailers if key == "grpc-status-details-bin")
    assert isinstance(details, bytes)
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.seconds > 0
