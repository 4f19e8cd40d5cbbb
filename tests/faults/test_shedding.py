"""Load shedding: past the configured number of requests in flight, new ones are refused at once
(429 with ``retry-after`` / RESOURCE_EXHAUSTED) instead of queueing without bound, probes are
still answered, and everything is served again once the load is gone."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from opea_grpc.channel import connect
from opea_grpc.client import ChatQnAClient
from opea_grpc.pb.v1 import chat_pb2, chatqna_pb2
from tests.faults import faulty
from tests.faults.faulty import Mode, Stack, faulty_stack
from tests.faults.load import QUESTION, eventually

LIMIT = 4

ASK = chatqna_pb2.AskRequest(
    chat=chat_pb2.ChatRequest(
        model="trivial-chat",
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="Hello?")],
    )
)


async def held(stack: Stack, http: httpx.AsyncClient, count: int) -> list[asyncio.Task[int]]:
    """``count`` requests left hanging at the chat backend (until its faults are released)."""
    chat = stack.faults["chat"]
    chat.set(Mode.HANG)
    before = chat.active

    async def one() -> int:
        return (await http.post("/v1/chat/completions", json=QUESTION)).status_code

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    assert await eventually(lambda: chat.active == before + count), chat.active
    return tasks


async def test_the_gateway_sheds_requests_beyond_its_in_flight_limit() -> None:
    async with (
        faulty_stack(max_in_flight=LIMIT) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):
        channel = connect(stack.gateway.target, [ChatQnAClient.SERVICE])
        ask = ChatQnAClient(channel, timeout=30)
        hanging = await held(stack, http, LIMIT - 1)
        stream = ask.ask_stream(ASK)  # the gRPC face counts against the same limit
        streaming = asyncio.ensure_future(anext(aiter(stream)))
        assert await eventually(lambda: stack.faults["chat"].active == LIMIT)

        began = time.perf_counter()
        refused = await http.post("/v1/chat/completions", json=QUESTION)
        rest_seconds = time.perf_counter() - began
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert "OPEA_GATEWAY_MAX_IN_FLIGHT" in refused.json()["error"]["message"]

        began = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ask.ask(ASK)
        grpc_seconds = time.perf_counter() - began
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing: dict[str, str | bytes] = dict(caught.value.trailing_metadata() or ())  # type: ignore[arg-type]
        assert trailing["retry-after"] == "1"
        details = trailing["grpc-status-details-bin"]
        assert isinstance(details, bytes)
        status = status_pb2.Status.FromString(details)
        info = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info)
        assert info.retry_delay.seconds == 1
        print(
            f"gateway full ({LIMIT} in flight): REST refused in {rest_seconds * 1000:.1f} ms,"
            f" gRPC in {grpc_seconds * 1000:.1f} ms"
        )
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(probe)).status_code == 200, probe

        stack.faults["chat"].released.set()
        assert await asyncio.gather(*hanging) == [200] * (LIMIT - 1)
        assert (await streaming).HasField("chunk")
        async for _ in stream:
            pass
        assert (await http.post("/v1/chat/completions", json=QUESTION)).status_code == 200
        assert (await ask.ask(ASK)).chat.message.content
        await channel.close(None)


async def test_a_service_past_its_concurrency_limit_answers_429_through_the_gateway() -> None:
    # OPEA_MAX_CONCURRENT_RPCS counts every call in flight, the health Watch stream each
    # client channel keeps open included: the gateway's one channel to chat takes one place.
    limited = dataclasses.replace(faulty.LOOPBACK, max_concurrent_rpcs=LIMIT)
    async with (
        faulty_stack(servers={"chat": limited}) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):
        hanging = await held(stack, http, LIMIT - 1)
        began = time.perf_counter()
        refused = await http.post("/v1/chat/completions", json=QUESTION)
        print(
            f"chat full ({LIMIT} calls): refused in {(time.perf_counter() - began) * 1000:.1f} ms"
        )
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "resource_exhausted"
        stack.faults["chat"].released.set()
        assert await asyncio.gather(*hanging) == [200] * (LIMIT - 1)
        assert (await http.post("/v1/chat/completions", json=QUESTION)).status_code == 200
