"""The gateway driven by the official ``openai`` SDK, sync and async, over real HTTP and gRPC."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from opea_grpc.errors import ServiceError
from services.chat import service as chat
from tests.gateway.conftest import LOOPBACK, Stack, default_services, running
from tests.gateway.fakes import MODEL, ScriptedChat

DOCS = [
    {"id": "grpc.md", "text": "gRPC carries protobuf messages over HTTP/2 between services."},
    {"id": "fruit.md", "text": "Bananas are rich in potassium. Apples are crunchy and sweet."},
    {"id": "ports.md", "text": "The gateway listens on port 8888 for REST requests."},
]
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Which fruit is rich in potassium?"}
]


async def ingest(stack: Stack, docs: list[dict[str, str]] = DOCS) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        reply = await http.post("/v1/ingest", json={"documents": docs})
    assert reply.status_code == 200, reply.text


def sdk(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.api, api_key="unused", max_retries=0)


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[Stack, ScriptedChat]]:
    """The gateway with a scripted chat backend (the other services are the real defaults)."""
    backend = ScriptedChat()
    services = default_services(tmp_path)
    services["chat"] = chat.build(LOOPBACK, chat.Settings(), backend)
    async with running(services) as stack:
        await ingest(stack)
        yield stack, backend


async def chat_model(client: openai.AsyncOpenAI) -> str:
    models = await client.models.list()
    return next(m.id for m in models.data if m.id.startswith("extractive"))


# -- answers -----------------------------------------------------------------------------------


async def test_chat_completion_async_cites_the_retrieved_passage(stack: Stack) -> None:
    await ingest(stack)
    client = sdk(stack)
    model = await chat_model(client)
    raw = await client.chat.completions.with_raw_response.create(model=model, messages=QUESTION)
    completion = raw.parse()
    answer = completion.choices[0].message.content or ""
    assert "Bananas are rich in potassium" in answer
    assert "[1]" in answer
    assert completion.model == model
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    report = (completion.model_extra or {})["opea"]
    assert report["sources"][0]["id"] == "fruit.md#0"
    assert report["sources"][0]["metadata"] == {"source": "fruit.md", "chunk": 0}
    assert [n["name"] for n in report["nodes"]] == ["embed", "retrieve", "rerank", "chat"]
    timing = raw.headers["server-timing"]
    for node in ("embed", "retrieve", "rerank", "chat", "total"):
        assert f"{node};dur=" in timing


async def test_chat_completion_with_the_sync_client(stack: Stack) -> None:
    await ingest(stack)
    model = await chat_model(sdk(stack))

    def ask() -> str:
        with openai.OpenAI(base_url=stack.api, api_key="unused", max_retries=0) as client:
            completion = client.chat.completions.create(model=model, messages=QUESTION)
            return completion.choices[0].message.content or ""

    assert "potassium" in await asyncio.to_thread(ask)


async def test_stream_chunks_arrive_before_the_last_token(
    scripted: tuple[Stack, ScriptedChat],
) -> None:
    stack, backend = scripted
    backend.released.clear()  # tokens after the first wait until the test has seen it
    stream = await sdk(stack).chat.completions.create(
        model=MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 1:
            assert backend.produced < len(backend.tokens)  # nothing was buffered
            assert chunk.choices[0].delta.role == "assistant"
            assert (chunk.model_extra or {})["opea"]["sources"][0]["id"] == "fruit.md#0"
            backend.released.set()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(backend.tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == len(backend.tokens)
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_without_include_usage_sends_no_usage_chunk(
    scripted: tuple[Stack, ScriptedChat],
) -> None:
    stack, _ = scripted
    stream = await sdk(stack).chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
    chunks = [c async for c in stream]
    assert chunks
    assert all(c.choices and c.usage is None for c in chunks)


async def test_sampling_fields_reach_the_model_and_zero_stays_zero(
    scripted: tuple[Stack, ScriptedChat],
) -> None:
    stack, backend = scripted
    await sdk(stack).chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, top_p=0.5, max_tokens=7, seed=3, stop="x"
    )
    prompt = backend.prompts[-1]
    assert (prompt.temperature, prompt.top_p, prompt.max_tokens, prompt.seed, prompt.stop) == (
        0.0,
        0.5,
        7,
        3,
        ("x",),
    )
    assert prompt.documents[0].startswith("Bananas")


async def test_rag_knobs_live_in_the_opea_extension(scripted: tuple[Stack, ScriptedChat]) -> None:
    stack, backend = scripted
    client = sdk(stack)
    without = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, extra_body={"opea": {"retrieval": False}}
    )
    assert (without.model_extra or {})["opea"]["sources"] == []
    assert backend.prompts[-1].documents == ()
    two = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, extra_body={"opea": {"top_n": 2, "rerank": False}}
    )
    report = (two.model_extra or {})["opea"]
    assert len(report["sources"]) == 2
    assert "rerank" not in [n["name"] for n in report["nodes"]]
    filtered = await client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        extra_body={"opea": {"filter": [{"key": "source", "value": "ports.md"}]}},
    )
    assert [s["id"] for s in (filtered.model_extra or {})["opea"]["sources"]] == ["ports.md#0"]


# -- embeddings, models, rerank ----------------------------------------------------------------


async def test_embeddings_float_and_base64_agree(stack: Stack) -> None:
    client = sdk(stack)
    model = next(m.id for m in (await client.models.list()).data if m.id.startswith("hashing"))
    floats = await client.embeddings.create(
        model=model, input=["hello world", "bananas"], encoding_format="float"
    )
    default = await client.embeddings.create(model=model, input=["hello world", "bananas"])
    assert [d.index for d in floats.data] == [0, 1]
    assert len(floats.data[0].embedding) == 384
    np.testing.assert_allclose(floats.data[1].embedding, default.data[1].embedding, rtol=1e-6)
    assert floats.usage.prompt_tokens > 0
    async with httpx.AsyncClient(base_url=stack.url) as http:
        raw = await http.post(
            "/v1/embeddings",
            json={"model": model, "input": "bananas", "encoding_format": "base64"},
        )
    packed = raw.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(packed), dtype="<f4")
    np.testing.assert_allclose(decoded, floats.data[1].embedding, rtol=1e-6)


async def test_models_list_and_retrieve(stack: Stack) -> None:
    client = sdk(stack)
    ids = {m.id for m in (await client.models.list()).data}
    assert {"extractive-answerer", "bm25-rrf"} <= ids
    assert any(i.startswith("hashing") for i in ids)
    assert (await client.models.retrieve("bm25-rrf")).id == "bm25-rrf"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_rerank_in_the_cohere_shape(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        reply = await http.post(
            "/v1/rerank",
            json={
                "query": "potassium in bananas",
                "documents": ["Apples are red.", {"text": "Bananas hold potassium."}],
                "top_n": 1,
            },
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "bm25-rrf"
    assert body["results"][0]["index"] == 1
    assert body["results"][0]["document"]["text"] == "Bananas hold potassium."


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "error", "status"),
    [
        (ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"), openai.RateLimitError, 429),
        (ServiceError(grpc.StatusCode.UNAVAILABLE, "down"), openai.InternalServerError, 503),
        (ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), openai.BadRequestError, 400),
        (RuntimeError("boom"), openai.InternalServerError, 500),
    ],
)
async def test_downstream_failures_raise_the_matching_sdk_error(
    scripted: tuple[Stack, ScriptedChat],
    failure: BaseException,
    error: type[openai.APIStatusError],
    status: int,
) -> None:
    stack, backend = scripted
    backend.fail = failure
    with pytest.raises(error) as caught:
        await sdk(stack).chat.completions.create(model=MODEL, messages=QUESTION)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}
    assert "boom" not in body["message"]  # an internal error's details stay in the log
    if status in (429, 503):
        assert caught.value.response.headers["retry-after"]


async def test_bad_requests_are_400_with_the_field_named(stack: Stack) -> None:
    client = sdk(stack)
    model = await chat_model(client)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=model, messages=QUESTION, temperature=5)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=model, messages=QUESTION, n=2)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=model, messages=[])
    assert caught.value.param == "messages"
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="gpt-nope", messages=QUESTION)
    assert not_found.value.code == "model_not_found"


async def test_deadline_gives_504(scripted: tuple[Stack, ScriptedChat]) -> None:
    stack, backend = scripted
    backend.hang = True
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(stack).chat.completions.create(
            model=MODEL, messages=QUESTION, extra_body={"opea": {"timeout": 0.5}}
        )
    assert caught.value.status_code == 504
    await asyncio.wait_for(backend.closed.wait(), 10)  # the chat call was cancelled too


async def test_failure_mid_stream_is_an_error_event(scripted: tuple[Stack, ScriptedChat]) -> None:
    stack, backend = scripted
    backend.fail_midway = ServiceError(grpc.StatusCode.UNAVAILABLE, "the model went away")
    stream = await sdk(stack).chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
    received: list[object] = []

    async def drain() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError, match="the model went away"):
        await drain()
    assert received  # some chunks came first; no [DONE] pretended success


# -- cancellation ------------------------------------------------------------------------------


async def test_closing_the_stream_cancels_the_chat_call(
    scripted: tuple[Stack, ScriptedChat],
) -> None:
    stack, backend = scripted
    backend.released.clear()
    stream = await sdk(stack).chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
    async for _ in stream:
        break
    await stream.close()
    await asyncio.wait_for(backend.closed.wait(), 10)  # seen by the chat service's backend
    assert backend.produced < len(backend.tokens)


async def test_disconnecting_a_unary_request_cancels_the_chat_call(
    scripted: tuple[Stack, ScriptedChat],
) -> None:
    stack, backend = scripted
    backend.hang = True
    client = openai.AsyncOpenAI(base_url=stack.api, api_key="unused", max_retries=0)
    call = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=QUESTION))
    await asyncio.wait_for(backend.started.wait(), 10)
    call.cancel()
    await client.close()
    await asyncio.wait_for(backend.closed.wait(), 10)
