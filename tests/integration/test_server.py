"""MicroService: lifecycle, health, graceful stop, error mapping."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opea_grpc import Context
from opea_grpc.batch import RerankBatching
from opea_grpc.channel import connect
from opea_grpc.client import RerankClient
from opea_grpc.config import ConfigError, ServerConfig
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import chat_pb2, chat_pb2_grpc, common_pb2, rerank_pb2, rerank_pb2_grpc
from opea_grpc.server import MicroService, ServiceRole, ServiceType
from opea_grpc.testing import serve, wait_for_serving
from tests.replica import IdentityReranker

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RERANK = "opea.v1.RerankService"

LOOPBACK = ServerConfig(host="127.0.0.1", port=0, health_interval=0.02)


def rerank_request(query: str = "q") -> rerank_pb2.RerankRequest:
    return rerank_pb2.RerankRequest(
        query=query, documents=[common_pb2.Document(id="1", text="one")]
    )


class Flag:
    def __init__(self) -> None:
        self.value = True

    def __call__(self) -> bool:
        return self.value


async def next_status(
    stream: grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse], wanted: int
) -> None:
    async def wait() -> None:
        async for response in stream:
            if response.status == wanted:
                return
        raise AssertionError("health stream ended before the status arrived")

    await asyncio.wait_for(wait(), 10)


def test_constructor_does_no_io() -> None:
    service = MicroService("idle")
    with pytest.raises(RuntimeError, match="not started"):
        _ = service.port
    assert service.service_role is ServiceRole.MICROSERVICE
    assert service.service_type is ServiceType.UNDEFINED


async def test_start_binds_ephemeral_port_and_health_serves() -> None:
    service = MicroService("r", service_type=ServiceType.RERANK, config=LOOPBACK)
    service.add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, IdentityReranker("a"))
    port = await service.start()
    try:
        assert port > 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", RERANK):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=RERANK), timeout=5)
            first = await watch.read()
            assert first.status == SERVING
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
            reply = await rerank_pb2_grpc.RerankServiceStub(channel).Rerank(
                rerank_request(), timeout=5
            )
            assert reply.model == "a"
    finally:
        await service.stop(0)


async def test_unix_socket_serves_beside_the_port_and_goes_with_the_server(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rerank.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # a socket file left by a killed server
        stale.bind(str(path))
    config = dataclasses.replace(LOOPBACK, unix_socket=str(path))
    service = MicroService("r", service_type=ServiceType.RERANK, config=config)
    service.add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, IdentityReranker("u"))
    port = await service.start()
    try:
        for target in (f"unix:{path}", f"127.0.0.1:{port}"):
            channel = connect(target, [RERANK])  # as the gateway makes them: health-checked
            try:
                await wait_for_serving(channel, RERANK)
                reply = await RerankClient(channel).rerank(rerank_request(), timeout=5)
                assert reply.model == "u"
            finally:
                await channel.close(None)
    finally:
        await service.stop(0)
    assert not path.exists()


def test_unix_socket_path_too_long_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="OPEA_UNIX_SOCKET"):
        ServerConfig(unix_socket="/tmp/" + "s" * 120)


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = MicroService("clash", config=ServerConfig(host="127.0.0.1", port=port))
        service.add_service(
            rerank_pb2_grpc.add_RerankServiceServicer_to_server, IdentityReranker("a")
        )
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await service.start()


async def test_readiness_flips_health_and_back() -> None:
    ready = Flag()
    adder = rerank_pb2_grpc.add_RerankServiceServicer_to_server
    # A plain channel: the one serve() yields skips a NOT_SERVING server by design.
    async with (
        serve((adder, IdentityReranker("a"), ready), config=LOOPBACK) as served,
        grpc.aio.insecure_channel(served.target) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        for service in (RERANK, ""):
            watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
            await next_status(watch, SERVING)
            ready.value = False
            await next_status(watch, NOT_SERVING)
            check = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert check.status == NOT_SERVING
            ready.value = True
            await next_status(watch, SERVING)
            watch.cancel()


async def test_readiness_that_raises_or_hangs_is_not_serving() -> None:
    calls = {"n": 0}

    async def flaky() -> bool:
        calls["n"] += 1
        if calls["n"] % 2:
            raise ConnectionError("backend down")
        await asyncio.Event().wait()  # hangs: the health timeout must cut it
        return True

    config = ServerConfig(host="127.0.0.1", port=0, health_interval=0.02, health_timeout=0.05)
    service = MicroService("flaky", config=config)
    service.add_service(
        rerank_pb2_grpc.add_RerankServiceServicer_to_server, IdentityReranker("a"), ready=flaky
    )
    await service.start()
    try:
        assert service.health.status(RERANK) == NOT_SERVING
        await service.refresh_health()
        assert service.health.status(RERANK) == NOT_SERVING
        assert service.health.status("") == NOT_SERVING
    finally:
        await service.stop(0)


class Gate(chat_pb2_grpc.ChatServiceServicer):
    """Holds each Chat call until released."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def Chat(self, request: chat_pb2.ChatRequest, context: Context) -> chat_pb2.ChatResponse:
        self.entered.set()
        await self.release.wait()
        return chat_pb2.ChatResponse(id="done")


async def test_stop_drains_in_flight_and_reports_not_serving_first() -> None:
    # The stubs mark every servicer method abstract; ChatStream answers UNIMPLEMENTED here.
    gate = Gate()  # type: ignore[abstract]
    service = MicroService("drain", config=LOOPBACK)
    service.add_service(chat_pb2_grpc.add_ChatServiceServicer_to_server, gate)
    port = await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert (await watch.read()).status == SERVING
        in_flight = asyncio.ensure_future(chat.Chat(chat_pb2.ChatRequest(), timeout=10))
        await asyncio.wait_for(gate.entered.wait(), 10)

        stopping = asyncio.ensure_future(service.stop(grace=10))
        # Health turns NOT_SERVING while the server still holds the in-flight call.
        assert (await watch.read()).status == NOT_SERVING
        assert not in_flight.done()

        # New calls are refused while the old one drains (bounded retry until the stop lands).
        refused = None
        for _ in range(200):
            try:
                await chat.Chat(chat_pb2.ChatRequest(), timeout=0.5)
            except grpc.aio.AioRpcError as exc:
                refused = exc.code()
                break
            await asyncio.sleep(0.01)
        assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert not stopping.done()

        gate.release.set()
        reply = await in_flight
        assert reply.id == "done"
        await asyncio.wait_for(stopping, 10)


class Failing(RerankBatching, rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: Context
    ) -> rerank_pb2.RerankResponse:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (
            ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "documents: send at most 100"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents: send at most 100",
        ),
        (
            ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "slow down",
        ),
        (
            KeyError("secret-internal-detail"),
            grpc.StatusCode.INTERNAL,
            "internal error in /opea.v1.RerankService/Rerank",
        ),
    ],
)
async def test_exceptions_become_statuses(
    exc: Exception, code: grpc.StatusCode, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    adder = rerank_pb2_grpc.add_RerankServiceServicer_to_server
    caplog.set_level(logging.ERROR, logger="opea_grpc")
    async with serve((adder, Failing(exc))) as served:
        stub = rerank_pb2_grpc.RerankServiceStub(served.channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Rerank(rerank_request(), timeout=5)
    assert info.value.code() is code
    assert message in (info.value.details() or "")
    assert "secret-internal-detail" not in (info.value.details() or "")
    assert "Traceback" not in (info.value.details() or "")
    logged = [r for r in caplog.records if r.name == "opea_grpc.interceptor"]
    if code is grpc.StatusCode.INTERNAL:
        assert len(logged) == 1
        assert logged[0].exc_info is not None
    else:
        assert logged == []


class StreamingFailure(chat_pb2_grpc.ChatServiceServicer):
    async def ChatStream(self, request, context):  # type: ignore[no-untyped-def]
        yield chat_pb2.ChatStreamResponse(content="first")
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "upstream went away")


async def test_stream_error_after_first_chunk_keeps_its_status() -> None:
    adder = chat_pb2_grpc.add_ChatServiceServicer_to_server
    async with serve((adder, StreamingFailure())) as served:  # type: ignore[abstract]
        stub = chat_pb2_grpc.ChatServiceStub(served.channel)
        received: list[str] = []

        async def consume() -> None:
            async for chunk in stub.ChatStream(chat_pb2.ChatStreamRequest(), timeout=5):
                received.append(chunk.content)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await consume()
    assert received == ["first"]
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "upstream went away"


async def test_add_service_rejects_duplicates_and_late_calls() -> None:
    adder = rerank_pb2_grpc.add_RerankServiceServicer_to_server
    service = MicroService("dup", config=LOOPBACK).add_service(adder, IdentityReranker("a"))
    with pytest.raises(ValueError, match="already registered"):
        service.add_service(adder, IdentityReranker("b"))
    await service.start()
    try:
        with pytest.raises(RuntimeError, match="before start"):
            service.add_service(
                chat_pb2_grpc.add_ChatServiceServicer_to_server,
                Gate(),  # type: ignore[abstract]
            )
    finally:
        await service.stop(0)


async def test_start_and_stop_hooks_wrap_serving() -> None:
    events: list[str] = []

    class Recording(RerankBatching, rerank_pb2_grpc.RerankServiceServicer):
        async def Rerank(
            self, request: rerank_pb2.RerankRequest, context: Context
        ) -> rerank_pb2.RerankResponse:
            events.append("call")
            return rerank_pb2.RerankResponse()

    async def opened() -> None:
        events.append("start")

    async def closed() -> None:
        events.append("stop")

    service = MicroService("hooks", config=LOOPBACK)
    service.add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, Recording())
    service.on_start(opened).on_stop(closed)
    port = await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await rerank_pb2_grpc.RerankServiceStub(channel).Rerank(rerank_request(), timeout=5)
    await service.stop(0)
    assert events == ["start", "call", "stop"]


async def test_failing_start_hook_fails_start_and_frees_the_port() -> None:
    async def broken() -> None:
        raise FileNotFoundError("index directory /nope does not exist")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = MicroService("broken", config=ServerConfig(host="127.0.0.1", port=port))
    service.add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, IdentityReranker("a"))
    service.on_start(broken)
    with pytest.raises(FileNotFoundError, match="/nope"):
        await service.start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = service.port
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # the failed start released the port


async def test_oversize_message_is_resource_exhausted_and_harmless() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, max_message_bytes=4096)
    adder = rerank_pb2_grpc.add_RerankServiceServicer_to_server
    async with serve((adder, IdentityReranker("a")), config=config) as served:
        stub = rerank_pb2_grpc.RerankServiceStub(served.channel)
        big = rerank_pb2.RerankRequest(
            query="q", documents=[common_pb2.Document(id="1", text="x" * 10_000)]
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Rerank(big, timeout=5)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (info.value.details() or "")
        # the server is unharmed: health still SERVING and a normal call still answered
        health = health_pb2_grpc.HealthStub(served.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=RERANK), timeout=5)
        assert reply.status == SERVING
        assert (await stub.Rerank(rerank_request(), timeout=5)).model == "a"


async def test_max_connection_age_closes_connections_so_clients_resolve_again() -> None:
    config = ServerConfig(max_connection_age=0.5, grace=1.0)
    async with serve(
        (rerank_pb2_grpc.add_RerankServiceServicer_to_server, IdentityReranker("aged")),
        config=config,
    ) as served:
        channel = grpc.aio.insecure_channel(served.service.target)
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        await stub.Rerank(rerank_request(), timeout=5)
        assert channel.get_state() is grpc.ChannelConnectivity.READY
        # The server sends GOAWAY once the connection is old enough: the channel leaves READY
        # (and resolves its target again on the next call).
        await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 10)
        assert (await stub.Rerank(rerank_request(), timeout=5)).results
        await channel.close(None)
