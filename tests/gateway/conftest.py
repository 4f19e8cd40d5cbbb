"""The gateway over the four built-in services, all in this process on loopback ports."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.service import GatewayService
from gateway.service import Settings as GatewaySettings
from gateway.service import build as build_gateway
from opea_grpc.config import ServerConfig
from opea_grpc.server import MicroService
from opea_grpc.testing import started
from services.chat import service as chat
from services.embedding import service as embedding
from services.rerank import service as rerank
from services.retrieval import service as retrieval
from tests.gateway.fakes import ScriptedChat

LOOPBACK = ServerConfig(host="127.0.0.1", port=0, grace=0.5)


@dataclass(frozen=True)
class Stack:
    """A running gateway and its services."""

    gateway: GatewayService
    services: dict[str, MicroService]

    @property
    def url(self) -> str:
        return self.gateway.rest.url

    @property
    def api(self) -> str:
        return f"{self.url}/v1"


def default_services(data: Path) -> dict[str, MicroService]:
    return {
        "embedding": embedding.build(LOOPBACK, embedding.Settings(backend="hashing")),
        "retrieval": retrieval.build(LOOPBACK, retrieval.Settings(data_dir=str(data))),
        "rerank": rerank.build(LOOPBACK, rerank.Settings()),
        "chat": chat.build(LOOPBACK, chat.Settings()),
    }


@asynccontextmanager
async def running(services: dict[str, MicroService], **settings: object) -> AsyncIterator[Stack]:
    """Start ``services`` and a gateway in front of them; stop all after."""
    async with AsyncExitStack() as stack:
        targets: dict[str, object] = {}
        for name, service in services.items():
            await stack.enter_async_context(started(service))
            targets[name] = service.target
        config = GatewaySettings(rest_port=0, **{**targets, **settings})  # type: ignore[arg-type]
        gw = build_gateway(LOOPBACK, config)
        await gw.start()
        stack.push_async_callback(gw.stop, 0)
        yield Stack(gw, services)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Gateway + hashing embedding, local retrieval, lexical rerank, extractive chat."""
    async with running(default_services(tmp_path)) as s:
        yield s


@pytest.fixture
async def scripted_stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, ScriptedChat]]:
    """The gateway with a scripted chat backend and one document ingested."""
    backend = ScriptedChat()
    services = default_services(tmp_path)
    services["chat"] = chat.build(LOOPBACK, chat.Settings(), backend)
    async with running(services) as s:
        async with httpx.AsyncClient(base_url=s.url) as http:
            docs = [{"id": "ports.md", "text": "The gateway listens on port 8888."}]
            assert (await http.post("/v1/ingest", json={"documents": docs})).status_code == 200
        yield s, backend


__all__ = ["LOOPBACK", "Stack", "dataclasses", "default_services", "running"]
