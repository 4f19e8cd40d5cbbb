"""The optional rerank node down, failing or slow: answers keep coming, marked degraded (REST
``opea.degraded``, gRPC ``AskResponse.degraded``), and rerank rejoins once it is well again."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import httpx

from opea_grpc.channel import connect
from opea_grpc.client import ChatQnAClient
from opea_grpc.config import ClientConfig
from opea_grpc.pb.v1 import chat_pb2, chatqna_pb2
from tests.faults import faulty
from tests.faults.faulty import Mode, Stack, faulty_stack
from tests.faults.load import QUESTION, Tally, drive

#: Rejoining takes a breaker interval and a reconnection (gRPC's backoff): this many requests
#: at most, one every REJOIN_EVERY seconds.
REJOIN_REQUESTS = 600
REJOIN_EVERY = 0.05
#: Opens after a few failures and probes again soon, so the test need not wait long.
QUICK_BREAKER = ClientConfig(breaker_min_calls=5, breaker_open_time=0.3)


def rerank_status(answer: dict[str, Any]) -> str:
    return str({n["name"]: n["status"] for n in answer["opea"]["nodes"]}["rerank"])


async def answers(stack: Stack, count: int) -> tuple[Tally, list[dict[str, Any]]]:
    """``count`` chat completions, 4 at a time; every one must be a 200 with text."""
    got: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:

        async def ask(number: int) -> None:
            reply = await http.post("/v1/chat/completions", json=QUESTION)
            if reply.status_code != 200:
                raise AssertionError(f"HTTP {reply.status_code}: {reply.text[:300]}")
            answer = reply.json()
            assert answer["choices"][0]["message"]["content"]
            got.append(answer)

        tally = await drive(ask, requests=count, concurrency=4)
    return tally, got


async def rejoined(stack: Stack) -> int:
    """Requests until an answer is not degraded any more (fails past REJOIN_REQUESTS)."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        for number in range(1, REJOIN_REQUESTS + 1):
            reply = await http.post("/v1/chat/completions", json=QUESTION)
            assert reply.status_code == 200, reply.text
            if not reply.json()["opea"]["degraded"]:
                return number
            await asyncio.sleep(REJOIN_EVERY)
    raise AssertionError(f"rerank did not rejoin within {REJOIN_REQUESTS} requests")


async def ask_grpc(stack: Stack) -> chatqna_pb2.AskResponse:
    channel = connect(stack.gateway.target, [ChatQnAClient.SERVICE])
    try:
        question = chatqna_pb2.AskRequest(
            chat=chat_pb2.ChatRequest(
                model="trivial-chat",
                messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="Hello?")],
            )
        )
        return await ChatQnAClient(channel).ask(question, timeout=30)
    finally:
        await channel.close(None)


async def test_a_failing_rerank_degrades_answers_until_it_is_well() -> None:
    async with faulty_stack(QUICK_BREAKER) as stack:
        stack.faults["rerank"].set(Mode.FAIL, code=grpc.StatusCode.INTERNAL)
        tally, got = await answers(stack, 60)
        print(tally.report("rerank failing (INTERNAL)"))
        assert tally.failures == []
        assert all(a["opea"]["degraded"] for a in got)
        assert {rerank_status(a) for a in got} == {"failed"}
        assert (await ask_grpc(stack)).degraded
        # The breaker opened: later calls failed fast without reaching the backend.
        breaker = stack.gateway.gateway.mesh.breakers["rerank"]
        assert breaker.opened >= 1
        assert breaker.rejected > 0
        assert stack.faults["rerank"].calls < 61

        stack.faults["rerank"].set(Mode.OK)
        took = await rejoined(stack)
        print(f"rerank well again: rejoined after {took} requests")
        assert not (await ask_grpc(stack)).degraded


async def test_a_slow_rerank_is_left_behind_and_rejoins() -> None:
    async with faulty_stack(QUICK_BREAKER, rerank_timeout=0.2) as stack:
        stack.faults["rerank"].set(Mode.SLOW, delay=5.0)
        tally, got = await answers(stack, 24)
        print(tally.report("rerank slower than its 0.2 s budget"))
        assert tally.failures == []
        assert all(a["opea"]["degraded"] for a in got)
        assert {rerank_status(a) for a in got} <= {"timed_out", "failed"}
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
            http.stream("POST", "/v1/chat/completions", json={**QUESTION, "stream": True}) as r,
        ):
            frames = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert '"degraded":true' in frames[0]

        stack.faults["rerank"].set(Mode.OK)
        took = await rejoined(stack)
        print(f"rerank fast again: rejoined after {took} requests")


async def test_a_rerank_that_goes_down_and_comes_back_rejoins() -> None:
    async with faulty_stack(QUICK_BREAKER) as stack:
        rerank = stack.services["rerank"]
        port = rerank.port
        await rerank.stop(0)
        tally, got = await answers(stack, 60)
        print(tally.report("rerank down"))
        assert tally.failures == []
        assert all(a["opea"]["degraded"] for a in got)
        assert (await ask_grpc(stack)).degraded

        config = dataclasses.replace(faulty.LOOPBACK, port=port)
        back = faulty.rerank(stack.faults["rerank"], config)
        await back.start()  # the gateway finds it again on its own: nothing here connects
        try:
            took = await rejoined(stack)
            print(f"rerank restarted on port {port}: rejoined after {took} requests")
        finally:
            await back.stop(0)
