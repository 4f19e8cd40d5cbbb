"""A downstream that keeps failing: the gateway stops calling it for a while (its circuit breaker
opens and calls fail fast, UNAVAILABLE naming it), probes it, and resumes once it answers; the
retries made meanwhile stay within the retry budget."""

from __future__ import annotations

import asyncio
import logging

import grpc
import httpx
import pytest

from opea_grpc.config import ClientConfig
from tests.faults.faulty import Mode, faulty_stack
from tests.faults.load import QUESTION, asker, drive

REQUESTS = 200


#: The typed clients' default retry budget (``opea_grpc.retry.RetryBudget``): a reserve of ten
#: retries, then one more per five calls.
RESERVE, RATIO = 10, 0.2


@pytest.mark.parametrize("breaker", [True, False], ids=["breaker", "no-breaker"])
async def test_a_failing_optional_node_costs_a_bounded_number_of_calls(breaker: bool) -> None:
    config = ClientConfig(breaker=breaker)
    async with faulty_stack(config) as stack:
        faults = stack.faults["rerank"]
        faults.set(Mode.FAIL, code=grpc.StatusCode.UNAVAILABLE)  # retryable: the worst case
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            tally = await drive(asker(http), requests=REQUESTS, concurrency=4)
        client = stack.gateway.gateway.mesh.clients.rerank
        assert client is not None
        rejected = client.breaker.rejected if client.breaker is not None else 0
        admitted = REQUESTS - rejected
        retries = faults.calls - admitted
        print(
            tally.report(f"rerank UNAVAILABLE, {'with' if breaker else 'without'} a breaker")
            + f"; rerank calls: {REQUESTS} asked, {rejected} failed fast, {admitted} admitted,"
            f" {faults.calls} reached it ({retries} retries, {client.retry_budget.retries} of"
            " them the client's own)"
        )
        assert tally.failures == []  # rerank is optional: every answer came, degraded
        # The client's own retries stay within its budget; gRPC's within its token bucket.
        assert client.retry_budget.retries <= RESERVE + RATIO * admitted
        assert retries - client.retry_budget.retries <= config.retry_max_tokens
        if breaker:
            assert client.breaker is not None
            assert client.breaker.opened >= 1
            assert rejected >= REQUESTS - 3 * config.breaker_min_calls


async def test_a_failing_required_node_fails_fast_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="opea_grpc.breaker")
    config = ClientConfig(breaker_min_calls=10, breaker_open_time=0.5)
    async with faulty_stack(config) as stack:
        faults = stack.faults["embedding"]
        faults.set(Mode.FAIL, code=grpc.StatusCode.INTERNAL)
        target = stack.services["embedding"].target
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            statuses = []
            for _ in range(40):
                reply = await http.post("/v1/chat/completions", json=QUESTION)
                statuses.append(reply.status_code)
            assert set(statuses[:10]) == {500}  # the backend's own INTERNAL, passed on
            assert reply.status_code == 503
            message = reply.json()["error"]["message"]
            assert f"embedding ({target}) is failing" in message
            assert "circuit breaker is open" in message
            assert reply.headers["retry-after"]
            assert faults.calls == 10  # the rest failed fast, without reaching it
            metrics = (await http.get("/metrics")).text
            assert 'opea_gateway_breaker_state{downstream="embedding"} 2.0' in metrics
            assert f"circuit to embedding ({target}) open" in caplog.text

            faults.set(Mode.OK)
            attempts = 0
            while attempts < 200:  # a breaker interval, one request every 50 ms
                attempts += 1
                reply = await http.post("/v1/chat/completions", json=QUESTION)
                if reply.status_code == 200:
                    break
                assert reply.status_code == 503
                await asyncio.sleep(0.05)
            print(f"embedding well again: answered after {attempts} requests")
            assert reply.status_code == 200, reply.text
            metrics = (await http.get("/metrics")).text
            assert 'opea_gateway_breaker_state{downstream="embedding"} 0.0' in metrics
            assert f"circuit to embedding ({target}) closed" in caplog.text
