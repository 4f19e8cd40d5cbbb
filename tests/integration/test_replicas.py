"""One target, several replicas: round-robin, health-aware, retried through a kill."""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import grpc
import pytest

from opea_grpc.channel import connect
from opea_grpc.client import RerankClient
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.pb.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc
from opea_grpc.server import MicroService
from tests.processes import served
from tests.replica import IdentityReranker

REQUEST = rerank_pb2.RerankRequest(query="q", documents=[common_pb2.Document(id="1", text="one")])


class Flag:
    def __init__(self, value: bool) -> None:
        self.value = value

    def __call__(self) -> bool:
        return self.value


async def start_replica(name: str, ready: Flag | None = None) -> MicroService:
    config = ServerConfig(host="127.0.0.1", port=0, health_interval=0.02)
    service = MicroService(name, config=config)
    service.add_service(
        rerank_pb2_grpc.add_RerankServiceServicer_to_server, IdentityReranker(name), ready=ready
    )
    await service.start()
    return service


def replica_target(*ports: int) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


async def test_two_replicas_share_calls_round_robin() -> None:
    a, b = await start_replica("a"), await start_replica("b")
    channel = connect(replica_target(a.port, b.port), [RerankClient.SERVICE])
    client = RerankClient(channel, timeout=5)
    try:
        seen: collections.Counter[str] = collections.Counter()
        # Connections come up lazily: call until both replicas have answered once.
        for _ in range(200):
            seen[(await client.rerank(REQUEST)).model] += 1
            if len(seen) == 2:
                break
        assert set(seen) == {"a", "b"}
        served = collections.Counter([(await client.rerank(REQUEST)).model for _ in range(40)])
        assert served == {"a": 20, "b": 20}
    finally:
        await channel.close(None)
        await a.stop(0)
        await b.stop(0)


async def test_not_serving_replica_gets_no_calls_and_rejoins() -> None:
    b_ready = Flag(False)
    a, b = await start_replica("a"), await start_replica("b", b_ready)
    channel = connect(replica_target(a.port, b.port), [RerankClient.SERVICE])
    client = RerankClient(channel, timeout=5)
    try:
        served = collections.Counter([(await client.rerank(REQUEST)).model for _ in range(40)])
        assert served == {"a": 40}
        b_ready.value = True
        for _ in range(500):
            if (await client.rerank(REQUEST)).model == "b":
                break
        else:
            raise AssertionError("replica b never rejoined after turning SERVING")
    finally:
        await channel.close(None)
        await a.stop(0)
        await b.stop(0)


@pytest.fixture
async def process_replicas(
    subprocess_env: dict[str, str],
) -> AsyncIterator[list[tuple[asyncio.subprocess.Process, int]]]:
    argv = ["-m", "opea_grpc", "serve", "tests.replica:build", "--host", "127.0.0.1", "--port", "0"]
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(served(subprocess_env, *argv)) for _ in range(2)
        ]
        yield [(replica.proc, replica.port) for replica in replicas]


async def test_killed_replica_causes_no_failed_call(
    process_replicas: list[tuple[asyncio.subprocess.Process, int]],
) -> None:
    (victim, p1), (survivor, p2) = process_replicas
    channel = connect(replica_target(p1, p2), [RerankClient.SERVICE], ClientConfig(max_attempts=5))
    client = RerankClient(channel, timeout=10)
    served: collections.Counter[str] = collections.Counter()
    failures: list[tuple[grpc.StatusCode, str | None, str]] = []
    calls = 0
    killed_after = None

    async def worker() -> None:
        nonlocal calls, killed_after
        while calls < 600:
            calls += 1
            try:
                served[(await client.rerank(REQUEST)).model] += 1
            except grpc.aio.AioRpcError as exc:
                failures.append((exc.code(), exc.details(), exc.debug_error_string()))
            if killed_after is None and len(served) == 2 and calls >= 100:
                killed_after = calls
                victim.send_signal(signal.SIGKILL)

    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), 120)
    finally:
        await channel.close(None)
    assert killed_after is not None, "both replicas never served"
    assert failures == []
    assert await victim.wait() == -signal.SIGKILL
    assert served[str(survivor.pid)] > 0
    assert served[str(victim.pid)] > 0
    assert sum(served.values()) == calls
