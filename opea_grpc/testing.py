"""Serve servicers on loopback for a test, with a ready channel.

>>> async with serve((rerank_pb2_grpc.add_RerankServiceServicer_to_server, MyReranker())) as s:
...     client = RerankClient(s.channel)
...     await client.rerank(request)
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opea_grpc.channel import connect
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.server import AddToServer, MicroService, Readiness


@dataclass(frozen=True)
class Served:
    """A running test server: the service, its port and a channel to it."""

    service: MicroService
    port: int
    target: str
    channel: grpc.aio.Channel


async def wait_for_serving(
    channel: grpc.aio.Channel, service: str = "", *, timeout: float = 10.0
) -> None:
    """Return once ``service`` on ``channel`` reports SERVING; raise if it does not in time.

    Uses the health Watch stream, so it waits for the change instead of polling.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
    )
    try:
        async for response in call:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
    except grpc.aio.AioRpcError as exc:
        raise TimeoutError(f"{service or 'server'} not SERVING: {exc.details()}") from exc
    finally:
        call.cancel()
    raise TimeoutError(f"{service or 'server'}: health stream ended before SERVING")


@asynccontextmanager
async def started(
    service: MicroService, client_config: ClientConfig | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """Start ``service``, yield a channel to it, then close the channel and stop the service.

    With the default client config the channel is made like production ones (round-robin,
    health checking, retries) and the service is awaited until health reads SERVING. With a
    ``client_config`` of its own (say, no retries, no health checking, to see each status as
    answered) only the connection is awaited, as the service may be NOT_SERVING on purpose.
    """
    await service.start()
    channel = connect(service.target, service.services, client_config or ClientConfig())
    try:
        if client_config is None:
            await wait_for_serving(channel)
        else:
            # gRPC shares subchannels process-wide: one left failing by an earlier server on
            # this port number would otherwise answer a no-retry call with its own error.
            await asyncio.wait_for(channel.channel_ready(), 10)
        yield channel
    finally:
        await channel.close(None)
        await service.stop(0)


@asynccontextmanager
async def serve(
    *services: tuple[AddToServer[Any], Any] | tuple[AddToServer[Any], Any, Readiness],
    config: ServerConfig | None = None,
    client_config: ClientConfig | None = None,
    name: str = "test",
) -> AsyncIterator[Served]:
    """Serve ``(add_to_server, servicer[, ready])`` pairs on 127.0.0.1, an ephemeral port.

    Yields once health reads SERVING; stops the server (grace 0) and closes the channel after.
    The channel is made like production ones (round-robin, health checking, retries).
    """
    cfg = dataclasses.replace(config or ServerConfig(), host="127.0.0.1", port=0)
    ms = MicroService(name, config=cfg)
    for entry in services:
        ready = entry[2] if len(entry) == 3 else None
        ms.add_service(entry[0], entry[1], ready=ready)
    async with started(ms, client_config) as channel:
        yield Served(service=ms, port=ms.port, target=ms.target, channel=channel)
