"""A service's Prometheus metrics on its metrics port, and service-to-service keys."""

from __future__ import annotations

import asyncio
import socket
import typing
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from opea_grpc.channel import connect
from opea_grpc.client import ChatClient
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.errors import ServiceError
from opea_grpc.keys import digest
from opea_grpc.pb.v1 import chat_pb2
from opea_grpc.server import MicroService
from opea_grpc.testing import wait_for_serving
from services.chat import service as chat_service
from tests.gateway.fakes import ScriptedChat

CHAT = "opea.v1.ChatService"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(text: str = "what is grpc?") -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content=text)]
    )


@dataclass
class Served:
    service: MicroService
    backend: ScriptedChat
    metrics_url: str
    client: ChatClient


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    port = free_port()
    backend = ScriptedChat()
    service = chat_service.build(
        ServerConfig(metrics_port=port), chat_service.Settings(), backend=backend
    )
    await service.start()
    channel = connect(service.target, [CHAT])
    try:
        yield Served(service, backend, f"http://127.0.0.1:{port}/metrics", ChatClient(channel))
    finally:
        await channel.close(None)
        await service.stop(0)


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


async def test_calls_are_counted_by_method_and_status(served: Served) -> None:
    before = await scrape(served.metrics_url)
    assert value(before, "grpc_server_handled_total", grpc_method="Chat") == 0
    await served.client.chat(request(), timeout=5)
    await served.client.chat(request(), timeout=5)
    served.backend.fail = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await served.client.chat(request(), timeout=5)
    assert failed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await served.client.chat(chat_pb2.ChatRequest(), timeout=5)  # no messages
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    after = await scrape(served.metrics_url)
    chat = {"grpc_service": CHAT, "grpc_method": "Chat", "grpc_type": "unary"}
    assert value(after, "grpc_server_started_total", **chat) == 4
    assert value(after, "grpc_server_handled_total", grpc_code="OK", **chat) == 2
    assert value(after, "grpc_server_handled_total", grpc_code="RESOURCE_EXHAUSTED", **chat) == 1
    assert value(after, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **chat) == 1
    assert value(after, "grpc_server_handling_seconds_count", **chat) == 4
    assert value(after, "opea_grpc_server_in_flight", **chat) == 0
    # Health checks are calls too, and are counted apart from the service's own.
    assert value(after, "grpc_server_handled_total", grpc_method="ListModels") == 0


async def test_streams_record_first_and_following_messages(served: Served) -> None:
    chunks = [c async for c in served.client.chat_stream(request(), timeout=5)]
    samples = await scrape(served.metrics_url)
    stream = {"grpc_method": "ChatStream", "grpc_type": "server_stream"}
    assert value(samples, "grpc_server_msg_sent_total", **stream) == len(chunks)
    assert value(samples, "opea_grpc_server_first_message_seconds_count", **stream) == 1
    assert (
        value(samples, "opea_grpc_server_inter_message_seconds_count", **stream) == len(chunks) - 1
    )
    assert value(samples, "grpc_server_handled_total", grpc_code="OK", **stream) == 1


async def test_in_flight_comes_down_when_the_client_leaves(served: Served) -> None:
    served.backend.released.clear()  # the stream holds after its first token
    stream = typing.cast(
        AsyncGenerator[chat_pb2.ChatStreamResponse, None],
        served.client.chat_stream(request(), timeout=30),
    )
    first = await anext(stream)
    assert first.content
    held = await scrape(served.metrics_url)
    assert value(held, "opea_grpc_server_in_flight", grpc_method="ChatStream") == 1
    await stream.aclose()  # the client goes away mid-stream
    await asyncio.wait_for(served.backend.closed.wait(), 10)
    for _ in range(100):  # the server notices the cancellation on its own time
        samples = await scrape(served.metrics_url)
        if value(samples, "grpc_server_handled_total", grpc_method="ChatStream"):
            break
        await asyncio.sleep(0.05)
    assert value(samples, "opea_grpc_server_in_flight", grpc_method="ChatStream") == 0
    assert (
        value(samples, "grpc_server_handled_total", grpc_method="ChatStream", grpc_code="CANCELLED")
        == 1
    )


async def test_a_deadline_that_passes_is_counted_and_leaves_nothing_in_flight(
    served: Served,
) -> None:
    served.backend.hang = True
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await served.client.chat(request(), timeout=0.3)
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(served.backend.closed.wait(), 10)
    for _ in range(100):
        samples = await scrape(served.metrics_url)
        if value(samples, "grpc_server_handled_total", grpc_method="Chat"):
            break
        await asyncio.sleep(0.05)
    assert value(samples, "opea_grpc_server_in_flight", grpc_method="Chat") == 0
    assert (
        value(
            samples, "grpc_server_handled_total", grpc_method="Chat", grpc_code="DEADLINE_EXCEEDED"
        )
        == 1
    )


async def test_no_metrics_port_means_nothing_recorded() -> None:
    service = chat_service.build(ServerConfig(), chat_service.Settings(), backend=ScriptedChat())
    async with service, grpc.aio.insecure_channel(service.target) as channel:
        await ChatClient(channel).chat(request(), timeout=5)
    assert service.metrics is None


async def test_a_metrics_port_in_use_fails_start_clearly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = chat_service.build(
            ServerConfig(metrics_port=port), chat_service.Settings(), backend=ScriptedChat()
        )
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await service.start()


# -- service-to-service keys ---------------------------------------------------------------


async def test_service_keys_refuse_callers_without_the_key() -> None:
    key, other = "os-right-key", "os-wrong-key"
    service = chat_service.build(
        ServerConfig(service_keys=(digest(key),)), chat_service.Settings(), backend=ScriptedChat()
    )
    async with service:
        for config, code in [
            (ClientConfig(), grpc.StatusCode.UNAUTHENTICATED),
            (ClientConfig(service_key=other), grpc.StatusCode.UNAUTHENTICATED),
        ]:
            channel = connect(service.target, [CHAT], config)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ChatClient(channel).chat(request(), timeout=5)
            assert refused.value.code() is code
            assert "service key" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError):  # streams too
                _ = [c async for c in ChatClient(channel).chat_stream(request(), timeout=5)]
            await channel.close(None)
        # Health stays open: probes and balancers need no key.
        bare = grpc.aio.insecure_channel(service.target)
        await wait_for_serving(bare, CHAT, timeout=5)
        await bare.close(None)
        keyed = connect(service.target, [CHAT], ClientConfig(service_key=key))
        reply = await ChatClient(keyed).chat(request(), timeout=5)
        assert reply.message.content
        chunks = [c async for c in ChatClient(keyed).chat_stream(request(), timeout=5)]
        assert chunks
        await keyed.close(None)
