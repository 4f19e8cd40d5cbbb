"""The chat service's ``openai`` backend against FakeOpenAI: the request it sends upstream,
the relay of answers, streams and usage, the mapping of upstream failures to status codes, and
the closing of the upstream connection when the caller cancels a stream."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opea_grpc.client import ChatClient
from opea_grpc.pb.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from services.chat.backend import Finish
from services.chat.openai import finish_of
from tests.openai_fake import FakeOpenAI, words
from tests.services.test_chat import (
    ASSISTANT,
    NO_RETRY,
    PASSAGES,
    QUESTION,
    SERVICE,
    SYSTEM,
    USER,
    chat_request,
    message,
    rejected,
    running,
    settings_for,
    shape,
    stream,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(model="chat-model") as server:
        yield server


def upstream_calls(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [body for path, body in fake.requests if path == "/v1/chat/completions"]


async def test_openai_translation_keeps_explicit_zeros_and_sends_only_what_is_set(
    fake: FakeOpenAI,
) -> None:
    req = chat_request(
        messages=[
            message("You are terse.", SYSTEM),
            chat_pb2.ChatMessage(role=USER, content=QUESTION, name="ada"),
        ],
        passages=PASSAGES[:2],
        temperature=0,
        top_p=0.7,
        max_tokens=64,
        seed=7,
        presence_penalty=0,
        stop=["END"],
        user="user-1",
    )
    async with running(settings_for("openai", fake.base_url)) as client:
        await client.chat(req)
    body = upstream_calls(fake)[-1]
    assert body["temperature"] == 0  # an explicit 0 stays 0
    assert body["presence_penalty"] == 0
    assert "frequency_penalty" not in body  # unset stays unset
    assert body["top_p"] == 0.7  # not 0.699999988 (the float32 in the proto)
    assert (body["max_tokens"], body["seed"], body["stop"], body["user"]) == (
        64,
        7,
        ["END"],
        "user-1",
    )
    assert body["model"] == "chat-model"
    assert "stream" not in body
    system, user = body["messages"]
    assert user == {"role": "user", "content": QUESTION, "name": "ada"}
    assert system["role"] == "system"
    assert system["content"].startswith("You are terse.\n\n")  # the context joins it
    assert f"[1] {PASSAGES[0]}\n\n[2] {PASSAGES[1]}" in system["content"]


async def test_openai_context_gets_its_own_system_message_and_template(fake: FakeOpenAI) -> None:
    settings = settings_for("openai", fake.base_url, context_template="Passages:\n{context}")
    async with running(settings) as client:
        await client.chat(chat_request(passages=PASSAGES[:2]))
        await client.chat(chat_request(passages=[]))
    with_context, without = upstream_calls(fake)[-2:]
    assert with_context["messages"] == [
        {"role": "system", "content": f"Passages:\n[1] {PASSAGES[0]}\n\n[2] {PASSAGES[1]}"},
        {"role": "user", "content": QUESTION},
    ]
    assert without["messages"] == [{"role": "user", "content": QUESTION}]
    assert set(without) == {"model", "messages"}  # nothing set, nothing sent


def fake_usage(body: dict[str, Any], answer: str) -> common_pb2.Usage:
    """What FakeOpenAI reports for ``body``: its own count, not ours."""
    prompt = sum(len(words(m["content"])) for m in body["messages"])
    return common_pb2.Usage(
        prompt_tokens=prompt,
        completion_tokens=len(words(answer)),
        total_tokens=prompt + len(words(answer)),
    )


async def test_openai_unary_relays_answer_and_usage(fake: FakeOpenAI) -> None:
    fake.answer = "The tower was completed in 1889 [1]."
    async with running(settings_for("openai", fake.base_url)) as client:
        response = await client.chat(chat_request())
    assert response.message.content == fake.answer
    assert response.model == "chat-model"
    assert response.usage == fake_usage(upstream_calls(fake)[-1], fake.answer)


async def test_openai_stream_relays_chunks_and_usage(fake: FakeOpenAI) -> None:
    fake.answer = "The tower was completed in 1889 [1]."
    async with running(settings_for("openai", fake.base_url)) as client:
        contents, finish, usage = shape(await stream(client, chat_request()))
    body = upstream_calls(fake)[-1]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert contents == ["", *re.findall(r"\S+\s*", fake.answer), ""]  # role, words, finish
    assert finish == chat_pb2.FINISH_REASON_STOP
    assert usage == fake_usage(body, fake.answer)


def test_openai_finish_reasons_map() -> None:
    assert finish_of(None) is None
    assert finish_of("stop") is Finish.STOP
    assert finish_of("length") is Finish.LENGTH
    assert finish_of("content_filter") is Finish.CONTENT_FILTER
    assert finish_of("tool_calls") is Finish.TOOL_CALLS
    assert finish_of("eos_token") is Finish.STOP  # TGI's own words for a natural end


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ((429, 429), grpc.StatusCode.RESOURCE_EXHAUSTED),  # still 429 after the one retry
        ((400,), grpc.StatusCode.INVALID_ARGUMENT),
        ((404,), grpc.StatusCode.NOT_FOUND),
        ((500,), grpc.StatusCode.UNAVAILABLE),
    ],
    ids=["429", "400", "404", "500"],
)
async def test_openai_upstream_errors_map_to_status_codes(
    fake: FakeOpenAI, statuses: tuple[int, ...], code: grpc.StatusCode, streamed: bool
) -> None:
    async with running(settings_for("openai", fake.base_url, max_retries=1), NO_RETRY) as client:
        fake.fail(*statuses)
        error = await rejected(client, chat_request(), streamed)
    assert error.code() is code
    assert f"HTTP {statuses[-1]}" in (error.details() or "")
    assert len(upstream_calls(fake)) == len(statuses)


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_openai_retries_a_429_until_the_upstream_answers(
    fake: FakeOpenAI, streamed: bool
) -> None:
    async with running(settings_for("openai", fake.base_url, max_retries=2)) as client:
        fake.fail(429, 429)
        if streamed:
            contents, _, _ = shape(await stream(client, chat_request()))
            content = "".join(contents)
        else:
            content = (await client.chat(chat_request())).message.content
    assert content == f"echo: {QUESTION}"
    assert len(upstream_calls(fake)) == 3


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_openai_upstream_down_is_unavailable_and_not_serving(streamed: bool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with running(settings_for("openai", url, max_retries=1), NO_RETRY) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            error = await rejected(client, chat_request(), streamed)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in (error.details() or "")


@pytest.mark.parametrize("how", ["cancel the call", "close the typed client's stream"])
async def test_cancelling_the_stream_closes_the_upstream_connection(
    fake: FakeOpenAI, how: str
) -> None:
    fake.hold = asyncio.Event()
    fake.answer = "one two three four"
    # The call's deadline (hence the upstream's read timeout) is far beyond the 10 s waited
    # for below: only the cancellation itself can close the upstream connection in time.
    timeout = 120
    try:
        async with running(settings_for("openai", fake.base_url)) as client:
            if how == "cancel the call":
                call = chat_pb2_grpc.ChatServiceStub(client.channel).ChatStream(
                    chat_pb2.ChatStreamRequest(request=chat_request()), timeout=timeout
                )
                role, word = await call.read(), await call.read()
                call.cancel()
            else:
                chunks = ChatClient(client.channel, timeout=timeout).chat_stream(chat_request())
                role, word = await anext(chunks), await anext(chunks)
                await chunks.aclose()  # type: ignore[attr-defined]
            # The first word came through while the upstream still held the rest: relayed,
            # not buffered.
            assert isinstance(role, chat_pb2.ChatStreamResponse)
            assert isinstance(word, chat_pb2.ChatStreamResponse)
            assert (role.role, word.content) == (ASSISTANT, "one ")
            await asyncio.wait_for(fake.disconnected.wait(), 10)
            assert not fake.stream_finished.is_set()
    finally:
        fake.hold.set()
