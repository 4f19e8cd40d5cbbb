"""Deadlines travel downstream, and cancelling a caller cancels the work it started."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from opea_grpc import Context
from opea_grpc.batch import RerankBatching
from opea_grpc.channel import connect
from opea_grpc.client import ChatClient
from opea_grpc.pb.v1 import chat_pb2, chat_pb2_grpc, rerank_pb2, rerank_pb2_grpc
from opea_grpc.testing import serve


class Downstream(chat_pb2_grpc.ChatServiceServicer):
    """Records the time it was given; optionally hangs until cancelled."""

    def __init__(self, *, hang: bool) -> None:
        self.hang = hang
        self.remaining: list[float | None] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def Chat(self, request: chat_pb2.ChatRequest, context: Context) -> chat_pb2.ChatResponse:
        self.remaining.append(context.time_remaining())
        self.started.set()
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return chat_pb2.ChatResponse(id="downstream")


class Upstream(RerankBatching, rerank_pb2_grpc.RerankServiceServicer):
    """A handler that makes a downstream call with a generous timeout of its own."""

    def __init__(self, chat: ChatClient) -> None:
        self.chat = chat
        self.remaining: list[float | None] = []
        self.cancelled = asyncio.Event()

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: Context
    ) -> rerank_pb2.RerankResponse:
        self.remaining.append(context.time_remaining())
        try:
            reply = await self.chat.chat(chat_pb2.ChatRequest(), timeout=60.0)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return rerank_pb2.RerankResponse(model=reply.id)


@pytest.mark.parametrize("timeout", [0.4, 3.0, 30.0])
async def test_downstream_sees_no_more_time_than_its_caller(timeout: float) -> None:
    # The stubs mark every servicer method abstract; unimplemented ones answer UNIMPLEMENTED.
    downstream = Downstream(hang=False)  # type: ignore[abstract]
    async with serve((chat_pb2_grpc.add_ChatServiceServicer_to_server, downstream)) as back:
        channel = connect(back.target, [ChatClient.SERVICE])
        upstream = Upstream(ChatClient(channel))
        async with serve((rerank_pb2_grpc.add_RerankServiceServicer_to_server, upstream)) as front:
            stub = rerank_pb2_grpc.RerankServiceStub(front.channel)
            reply = await stub.Rerank(rerank_pb2.RerankRequest(query="q"), timeout=timeout)
        await channel.close(None)
    assert reply.model == "downstream"
    (caller_had,) = upstream.remaining
    (callee_had,) = downstream.remaining
    assert caller_had is not None
    assert callee_had is not None
    # The upstream asked for 60 s; the downstream got what the caller had left, no more.
    assert callee_had <= caller_had


async def test_expired_deadline_downstream_is_deadline_exceeded() -> None:
    downstream = Downstream(hang=True)  # type: ignore[abstract]
    async with serve((chat_pb2_grpc.add_ChatServiceServicer_to_server, downstream)) as back:
        channel = connect(back.target, [ChatClient.SERVICE])
        upstream = Upstream(ChatClient(channel))
        async with serve((rerank_pb2_grpc.add_RerankServiceServicer_to_server, upstream)) as front:
            stub = rerank_pb2_grpc.RerankServiceStub(front.channel)
            try:
                await stub.Rerank(rerank_pb2.RerankRequest(query="q"), timeout=0.5)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            else:
                raise AssertionError("a hanging downstream must not answer")
            # The downstream's own deadline expired too: its handler was cancelled.
            await asyncio.wait_for(downstream.cancelled.wait(), 10)
        await channel.close(None)
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_cancelling_the_caller_cancels_the_downstream_handler() -> None:
    downstream = Downstream(hang=True)  # type: ignore[abstract]
    async with serve((chat_pb2_grpc.add_ChatServiceServicer_to_server, downstream)) as back:
        channel = connect(back.target, [ChatClient.SERVICE])
        upstream = Upstream(ChatClient(channel))
        async with serve((rerank_pb2_grpc.add_RerankServiceServicer_to_server, upstream)) as front:
            stub = rerank_pb2_grpc.RerankServiceStub(front.channel)
            call = stub.Rerank(rerank_pb2.RerankRequest(query="q"), timeout=60)
            await asyncio.wait_for(downstream.started.wait(), 10)
            call.cancel()
            await asyncio.wait_for(upstream.cancelled.wait(), 10)
            await asyncio.wait_for(downstream.cancelled.wait(), 10)
        await channel.close(None)
    assert call.cancelled()
