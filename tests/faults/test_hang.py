"""A backend that hangs: each request fails with 504 / DEADLINE_EXCEEDED when its deadline
passes, and nothing is left behind: no task, no connection, no in-flight count, no hung call at
the backend (its handler is cancelled with the call)."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import psutil

from gateway.metrics import Metrics
from opea_grpc.channel import connect
from opea_grpc.client import ChatQnAClient
from opea_grpc.pb.v1 import chat_pb2, chatqna_pb2
from tests.faults.faulty import Mode, Stack, faulty_stack
from tests.faults.load import QUESTION, eventually

#: The deadline each hung request asks for, in seconds.
DEADLINE = 1.0
#: How much longer than its deadline the test waits for an answer before calling it lost.
SLACK = 15.0


def in_flight(metrics: Metrics) -> float:
    return sum(s.value for m in metrics.in_flight.collect() for s in m.samples)


def connections() -> int:
    return sum(1 for c in psutil.Process().net_connections("tcp") if c.status == "ESTABLISHED")


async def steady(stack: Stack) -> tuple[int, int]:
    """Tasks and established connections once a request has come and gone."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        reply = await http.post("/v1/chat/completions", json=QUESTION)
        assert reply.status_code == 200, reply.text
    await asyncio.sleep(0)  # let the connection's tasks end
    await eventually(lambda: in_flight(stack.gateway.gateway.metrics) == 0)
    return len(asyncio.all_tasks()), connections()


async def test_a_hung_chat_fails_every_request_at_its_deadline_and_leaks_nothing() -> None:
    async with faulty_stack() as stack:
        tasks, conns = await steady(stack)
        hung = stack.faults["chat"]
        hung.set(Mode.HANG)
        before = hung.calls
        body = {**QUESTION, "opea": {"timeout": DEADLINE}}
        channel = connect(stack.gateway.target, [ChatQnAClient.SERVICE])
        ask = ChatQnAClient(channel)
        question = chatqna_pb2.AskRequest(
            chat=chat_pb2.ChatRequest(
                model="trivial-chat",
                messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="Hello?")],
            )
        )
        seconds: list[float] = []

        async def rest(stream: bool) -> tuple[int, str]:
            began = time.perf_counter()
            async with httpx.AsyncClient(base_url=stack.url, timeout=DEADLINE + SLACK) as http:
                reply = await http.post("/v1/chat/completions", json={**body, "stream": stream})
            seconds.append(time.perf_counter() - began)
            return reply.status_code, reply.json()["error"]["code"]

        async def grpc_face(stream: bool) -> grpc.StatusCode:
            began = time.perf_counter()
            try:
                if stream:
                    async for _ in ask.ask_stream(question, timeout=DEADLINE):
                        pass
                else:
                    await ask.ask(question, timeout=DEADLINE)
            except grpc.aio.AioRpcError as exc:
                seconds.append(time.perf_counter() - began)
                return exc.code()
            return grpc.StatusCode.OK

        answers = await asyncio.gather(
            *(rest(stream=i % 2 == 1) for i in range(8)),
            *(grpc_face(stream=i % 2 == 1) for i in range(4)),
        )
        await channel.close(None)
        print(
            f"hung chat: sent {len(answers)}, failed {len(answers)} as expected (504 or"
            f" DEADLINE_EXCEEDED), slowest answer {max(seconds):.2f} s for a {DEADLINE} s"
            " deadline"
        )
        assert answers[:8] == [(504, "deadline_exceeded")] * 8
        assert answers[8:] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4
        assert hung.calls - before == 12  # each reached the backend once: no retry

        # Nothing left behind: the hung handlers were cancelled with their calls ...
        assert await eventually(lambda: hung.active == 0), f"{hung.active} calls still hang"
        # ... and the gateway holds what it held before.
        metrics = stack.gateway.gateway.metrics
        assert await eventually(lambda: in_flight(metrics) == 0), in_flight(metrics)
        assert await eventually(lambda: len(asyncio.all_tasks()) <= tasks), [
            t.get_coro() for t in asyncio.all_tasks()
        ]
        assert await eventually(lambda: connections() <= conns), (connections(), conns)

        hung.set(Mode.OK)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            reply = await http.post("/v1/chat/completions", json=QUESTION)
        assert reply.status_code == 200, reply.text


async def test_a_stream_that_stalls_ends_with_an_error_event_at_its_deadline() -> None:
    async with faulty_stack() as stack:
        stalled = stack.faults["chat"]
        stalled.set(Mode.STALL)
        body = {**QUESTION, "stream": True, "opea": {"timeout": DEADLINE}}
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=DEADLINE + SLACK) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as reply,
        ):
            assert reply.status_code == 200
            frames = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
        assert '"content"' in frames[0] or '"role"' in frames[0]
        assert frames[-1].startswith('data: {"error"'), frames[-1]
        assert '"code":"deadline_exceeded"' in frames[-1]
        assert "data: [DONE]" not in frames
        assert await eventually(lambda: stalled.active == 0)
        assert await eventually(lambda: in_flight(stack.gateway.gateway.metrics) == 0)
