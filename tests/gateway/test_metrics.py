"""The gateway's /metrics move as requests succeed and fail; in-flight gauges come back to zero."""

from __future__ import annotations

import asyncio

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from opea_grpc.client import ChatQnAClient
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import chat_pb2, chatqna_pb2
from tests.gateway.conftest import Stack
from tests.gateway.fakes import MODEL, ScriptedChat

ROUTE = "/v1/chat/completions"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Which port is it?"}]}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families((await http.get("/metrics")).text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def in_flight(samples: Samples) -> float:
    return value(samples, "opea_gateway_in_flight", route=ROUTE)


async def settled(http: httpx.AsyncClient) -> Samples:
    """The metrics once no chat request is in flight (a cancelled one ends on its own time)."""
    for _ in range(200):
        samples = await scrape(http)
        if in_flight(samples) == 0:
            return samples
        await asyncio.sleep(0.05)
    return samples


async def test_counters_and_histograms_move_with_successes_and_failures(
    scripted_stack: tuple[Stack, ScriptedChat],
) -> None:
    stack, backend = scripted_stack
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        before = await scrape(http)
        assert (await http.post(ROUTE, json=ASK)).status_code == 200
        backend.fail = ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is loading")
        assert (await http.post(ROUTE, json=ASK)).status_code == 503
        assert (await http.post(ROUTE, content=b"{not json")).status_code == 400
        after = await settled(http)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("opea_gateway_requests_total", route=ROUTE, status="200") == 1
    assert moved("opea_gateway_requests_total", route=ROUTE, status="503") == 1
    assert moved("opea_gateway_requests_total", route=ROUTE, status="400") == 1
    assert moved("opea_gateway_request_seconds_count", route=ROUTE) == 3
    assert moved("opea_gateway_node_seconds_count", node="chat", outcome="ok") == 1
    assert moved("opea_gateway_node_seconds_count", node="chat", outcome="failed") == 1
    assert in_flight(after) == 0


async def test_in_flight_returns_to_zero_after_disconnects_and_timeouts(
    scripted_stack: tuple[Stack, ScriptedChat],
) -> None:
    stack, backend = scripted_stack
    backend.released.clear()  # streams hold after their first token
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        async with http.stream("POST", ROUTE, json={**ASK, "stream": True}) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    break
            assert in_flight(await scrape(http)) == 1
        # the client left mid-stream
        await asyncio.wait_for(backend.closed.wait(), 10)
        assert in_flight(await settled(http)) == 0

        backend.hang = True
        backend.closed.clear()
        late = await http.post(ROUTE, json={**ASK, "opea": {"timeout": 0.3}})
        assert late.status_code == 504
        after = await settled(http)
        assert in_flight(after) == 0
        assert value(after, "opea_gateway_node_seconds_count", node="chat", outcome="timed_out")


async def test_the_grpc_face_is_counted_on_the_same_metrics(
    scripted_stack: tuple[Stack, ScriptedChat],
) -> None:
    stack, _ = scripted_stack
    question = chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="Which port?")
    async with grpc.aio.insecure_channel(stack.gateway.target) as channel:
        await ChatQnAClient(channel).ask(
            chatqna_pb2.AskRequest(chat=chat_pb2.ChatRequest(messages=[question])), timeout=10
        )
    async with httpx.AsyncClient(base_url=stack.url) as http:
        samples = await scrape(http)
    labels = {"grpc_service": "opea.v1.ChatQnAService", "grpc_method": "Ask"}
    assert value(samples, "grpc_server_handled_total", grpc_code="OK", **labels) == 1
    assert value(samples, "opea_grpc_server_in_flight", **labels) == 0


async def test_query_embeddings_are_counted_by_the_calls_that_served_them(
    scripted_stack: tuple[Stack, ScriptedChat],
) -> None:
    stack, _ = scripted_stack
    questions = [f"Which port is it, take {i}?" for i in range(6)]
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        before = await scrape(http)
        replies = await asyncio.gather(
            *(
                http.post(ROUTE, json={**ASK, "messages": [{"role": "user", "content": q}]})
                for q in questions
            )
        )
        assert [r.status_code for r in replies] == [200] * len(questions)
        after = await scrape(http)
    requests = value(after, "opea_gateway_coalesced_requests_total", node="embed") - value(
        before, "opea_gateway_coalesced_requests_total", node="embed"
    )
    calls = value(after, "opea_gateway_coalesced_calls_total", node="embed") - value(
        before, "opea_gateway_coalesced_calls_total", node="embed"
    )
    assert requests == len(questions)  # each question's embedding, none from the cache
    assert 1 <= calls <= requests
