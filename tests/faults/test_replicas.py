"""Two replicas of each stage behind the gateway, under a steady load: one replica of each stage
in turn is killed (SIGKILL) or stopped (SIGTERM) in the middle of it, then started again on its
port. No request fails, and the gateway connects to the restarted replica again.

SIGKILL loses the calls a replica was serving: gRPC retries those that had not begun, the typed
clients retry those cut off mid-reply (within their retry budget). The SIGKILL load is unary:
a stream cut after its first chunk cannot be replayed. SIGTERM drains: the replica turns
NOT_SERVING, finishes what it has, streams included, and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from gateway.service import GatewayService
from gateway.service import Settings as GatewaySettings
from gateway.service import build as build_gateway
from opea_grpc.config import ServerConfig
from tests.faults.load import asker, drive
from tests.faults.processes import STAGES, Replicas, connected, replicated
from tests.processes import Served

REQUESTS = 300
CONCURRENCY = 8
FAULT_AFTER = 60


@asynccontextmanager
async def gateway_over(replicas: Replicas) -> AsyncIterator[GatewayService]:
    targets = {stage: replicas.target(stage) for stage in STAGES}
    settings = GatewaySettings(rest_port=0, cache_size=0, **targets)  # type: ignore[arg-type]
    gw = build_gateway(ServerConfig(host="127.0.0.1", port=0, grace=1), settings)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(0)


async def ready(http: httpx.AsyncClient) -> None:
    for _ in range(600):  # every stage SERVING through the gateway's channels
        if (await http.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never saw every stage SERVING")


def retries(gw: GatewayService, stage: str) -> int:
    """The retries the gateway's client of ``stage`` made itself (past gRPC's own)."""
    client = getattr(gw.gateway.mesh.clients, stage)
    return int(client.retry_budget.retries)


async def each_stage_in_turn(
    replicas: Replicas,
    gw: GatewayService,
    http: httpx.AsyncClient,
    index: int,
    what: str,
    fault: Callable[[Served], Awaitable[int]],
    stream_every: int,
) -> None:
    for stage in STAGES:
        victim = replicas.by_stage[stage][index]
        ended: list[int] = []
        retried = retries(gw, stage)

        async def strike(victim: Served = victim, ended: list[int] = ended) -> None:
            ended.append(await fault(victim))

        tally = await drive(
            asker(http, stream_every=stream_every),
            requests=REQUESTS,
            concurrency=CONCURRENCY,
            fault=strike,
            fault_after=FAULT_AFTER,
        )
        retried = retries(gw, stage) - retried
        print(tally.report(f"{what} one of two {stage} replicas") + f"; {retried} calls retried")
        assert tally.failures == [], tally.failures[:5]
        code = ended[0]
        back = await replicas.restart(stage, index)
        assert await connected(back), f"the gateway never reconnected to the new {stage}"
        print(f"  {stage} replica ended with {code}, restarted on port {back.port}")
        if what == "SIGTERM":
            assert code == 0, f"{stage} did not stop cleanly on SIGTERM: {code}"
        else:
            assert code == -signal.SIGKILL


async def sigkill(victim: Served) -> int:
    victim.proc.send_signal(signal.SIGKILL)
    return await victim.proc.wait()


async def sigterm(victim: Served) -> int:
    return await victim.stop(signal.SIGTERM)


@pytest.mark.slow
async def test_sigkill_of_one_replica_per_stage_fails_no_request(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    async with (
        replicated(subprocess_env, tmp_path) as replicas,
        gateway_over(replicas) as gw,
        httpx.AsyncClient(base_url=gw.rest.url, timeout=30) as http,
    ):
        await ready(http)
        await each_stage_in_turn(replicas, gw, http, 0, "SIGKILL", sigkill, stream_every=0)


@pytest.mark.slow
async def test_sigterm_of_one_replica_per_stage_drains_and_fails_no_request(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    async with (
        replicated(subprocess_env, tmp_path) as replicas,
        gateway_over(replicas) as gw,
        httpx.AsyncClient(base_url=gw.rest.url, timeout=30) as http,
    ):
        await ready(http)
        await each_stage_in_turn(replicas, gw, http, 1, "SIGTERM", sigterm, stream_every=3)
    for log in sorted(tmp_path.glob("*.log")):  # noqa: ASYNC240 - a few small files, once
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
