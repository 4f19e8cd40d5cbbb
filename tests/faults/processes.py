"""Services as child processes for fault tests: replicas of the trivial backends, a gateway.

A replica can be killed and started again on the same port; :func:`connected` tells when a
client (the gateway) holds a connection to it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.faults.load import eventually
from tests.processes import Served, served

STAGES = ("embedding", "retrieval", "rerank", "chat")


def serve_argv(spec: str, port: int = 0) -> list[str]:
    return ["-m", "opea_grpc", "serve", spec, "--host", "127.0.0.1", "--port", str(port)]


@dataclass
class Replicas:
    """Every stage's replicas (processes of ``bench.trivial``), started in ``stack``."""

    env: dict[str, str]
    stack: AsyncExitStack
    logs: Path
    by_stage: dict[str, list[Served]] = field(default_factory=dict)

    async def start(self, stage: str, port: int = 0) -> Served:
        log = self.logs / f"{stage}.log"
        return await self.stack.enter_async_context(
            served(self.env, *serve_argv(f"bench.trivial:{stage}", port), stderr=log)
        )

    def target(self, stage: str) -> str:
        """The gateway's target for ``stage``: every replica, by address."""
        return "ipv4:" + ",".join(r.target for r in self.by_stage[stage])

    async def restart(self, stage: str, index: int) -> Served:
        """Start replica ``index`` of ``stage`` again, on the port it had."""
        old = self.by_stage[stage][index]
        new = await self.start(stage, old.port)
        self.by_stage[stage][index] = new
        return new

    def pids(self) -> dict[str, int]:
        return {
            f"{stage}-{i}": r.pid for stage, rs in self.by_stage.items() for i, r in enumerate(rs)
        }


@contextlib.asynccontextmanager
async def replicated(env: dict[str, str], logs: Path, count: int = 2) -> AsyncIterator[Replicas]:
    """``count`` replicas of each stage, started concurrently; killed and reaped after."""
    async with AsyncExitStack() as stack:
        replicas = Replicas(env, stack, logs)
        for stage in STAGES:
            replicas.by_stage[stage] = []
        started = await asyncio.gather(
            *(replicas.start(stage) for stage in STAGES for _ in range(count))
        )
        for i, served_one in enumerate(started):
            replicas.by_stage[STAGES[i // count]].append(served_one)
        yield replicas


def established(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a connection accepted on ``port``."""
    try:
        conns = psutil.Process(pid).net_connections("tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in conns)


async def connected(replica: Served, timeout: float = 60.0) -> bool:
    """Whether some client connects to ``replica`` within ``timeout`` seconds."""
    return await eventually(lambda: established(replica.pid, replica.port), timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    """Resident memory of process ``pid``, in bytes."""
    return int(psutil.Process(pid).memory_info().rss)
