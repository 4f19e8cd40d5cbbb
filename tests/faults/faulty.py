"""Backends that fail on demand, behind the real servicers, and the stacks built on them.

Each wraps a trivial backend of ``bench.trivial`` (so the work itself costs nothing) with a
:class:`Faults` switch the test turns: serve, fail with a status, hang until released, or answer
late. Only the backend is fake: servicer, server, health, channels and gateway are the real ones.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import grpc

from gateway.service import GatewayService
from gateway.service import Settings as GatewaySettings
from gateway.service import build as build_gateway
from opea_grpc import models
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import (
    chat_pb2_grpc,
    common_pb2,
    embedding_pb2_grpc,
    rerank_pb2_grpc,
)
from opea_grpc.server import MicroService, ServiceType
from opea_grpc.testing import started
from services.chat.backend import ChatBackend, Completion, Delta, Prompt, TokenUsage
from services.chat.servicer import ChatServicer
from services.embedding.backend import Embedder, Embeddings, ModelInfo
from services.embedding.servicer import EmbeddingServicer
from services.rerank.backend import Ranking, Reranker
from services.rerank.servicer import RerankServicer

# Imported by name: bench/ is a directory of scripts, not a package, and mypy checks
# bench/trivial.py as the module "trivial"; a static import would make it "bench.trivial" too.
trivial = importlib.import_module("bench.trivial")

LOOPBACK = ServerConfig(host="127.0.0.1", port=0, grace=0.5, health_interval=0.1)


def _catalog(model: str, kind: common_pb2.ModelKind.ValueType) -> models.ModelCatalog:
    listed = [common_pb2.Model(id=model, owned_by=trivial.OWNER, kind=kind)]
    return models.ModelCatalog(lambda: listed)


class Mode(enum.Enum):
    OK = "ok"
    FAIL = "fail"  # raise ServiceError(code)
    HANG = "hang"  # wait until released (never, unless the test releases it)
    SLOW = "slow"  # answer after ``delay`` seconds
    STALL = "stall"  # streams: send the first chunk, then hang


@dataclass
class Faults:
    """What the backend does with its next calls, and what it has seen."""

    mode: Mode = Mode.OK
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    delay: float = 0.0
    #: Calls the backend received, and those still running (a hung call nobody cancelled
    #: stays here: that is a leak).
    calls: int = 0
    active: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def set(self, mode: Mode, **changes: object) -> None:
        self.mode = mode
        for name, value in changes.items():
            setattr(self, name, value)

    async def act(self) -> None:
        """Called at the start of each backend call: do what the mode says."""
        self.calls += 1
        mode = self.mode
        if mode is Mode.FAIL:
            raise ServiceError(self.code, f"injected {self.code.name}")
        if mode is Mode.HANG:
            await self.released.wait()
        elif mode is Mode.SLOW:
            await asyncio.sleep(self.delay)

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        self.active += 1
        try:
            await self.act()
            yield
        finally:
            self.active -= 1


class FaultyEmbedder:
    """An ``Embedder`` that asks its faults before the trivial one answers."""

    def __init__(self, faults: Faults, inner: Embedder | None = None) -> None:
        self.faults = faults
        self._inner: Embedder = inner if inner is not None else trivial.FixedEmbedder()

    @property
    def info(self) -> ModelInfo:
        return self._inner.info

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    async def ready(self) -> bool:
        return await self._inner.ready()

    async def embed(self, texts: Sequence[str], *, user: str = "") -> Embeddings:
        async with self.faults.call():
            return await self._inner.embed(texts, user=user)


class FaultyReranker:
    """A ``Reranker`` that asks its faults before the trivial one answers."""

    def __init__(self, faults: Faults, inner: Reranker | None = None) -> None:
        self.faults = faults
        self._inner: Reranker = inner if inner is not None else trivial.FirstReranker()

    @property
    def model(self) -> str:
        return self._inner.model

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    async def ready(self) -> bool:
        return await self._inner.ready()

    async def rerank(self, query: str, texts: Sequence[str], top_n: int | None) -> Ranking:
        async with self.faults.call():
            return await self._inner.rerank(query, texts, top_n)


class FaultyChat:
    """A ``ChatBackend`` that asks its faults before the trivial one answers (and, stalling,
    after its first chunk)."""

    def __init__(self, faults: Faults, inner: ChatBackend | None = None) -> None:
        self.faults = faults
        self._inner: ChatBackend = inner if inner is not None else trivial.FixedChat()

    @property
    def model(self) -> str:
        return self._inner.model

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    async def ready(self) -> bool:
        return await self._inner.ready()

    async def complete(self, prompt: Prompt) -> Completion:
        async with self.faults.call():
            return await self._inner.complete(prompt)

    async def stream(self, prompt: Prompt) -> AsyncGenerator[Delta | TokenUsage, None]:
        faults = self.faults
        stall = faults.mode is Mode.STALL
        async with faults.call():
            first = True
            async for piece in self._inner.stream(prompt):
                yield piece
                if stall and first:
                    await faults.released.wait()
                first = False


def embedding(faults: Faults, config: ServerConfig = LOOPBACK) -> MicroService:
    servicer = EmbeddingServicer(FaultyEmbedder(faults), max_inputs=2048, max_input_chars=100_000)
    return (
        MicroService("embedding", service_type=ServiceType.EMBEDDING, config=config)
        .add_service(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, servicer)
        .add_service(
            models.add_to_server,
            _catalog(trivial.EMBEDDING_MODEL, common_pb2.MODEL_KIND_EMBEDDING),
        )
    )


def rerank(faults: Faults, config: ServerConfig = LOOPBACK) -> MicroService:
    servicer = RerankServicer(FaultyReranker(faults), max_documents=1000)
    return (
        MicroService("rerank", service_type=ServiceType.RERANK, config=config)
        .add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, servicer)
        .add_service(
            models.add_to_server,
            _catalog(trivial.RERANK_MODEL, common_pb2.MODEL_KIND_RERANK),
        )
    )


def chat(faults: Faults, config: ServerConfig = LOOPBACK) -> MicroService:
    return (
        MicroService("chat", service_type=ServiceType.LLM, config=config)
        .add_service(
            chat_pb2_grpc.add_ChatServiceServicer_to_server, ChatServicer(FaultyChat(faults))
        )
        .add_service(models.add_to_server, _catalog(trivial.CHAT_MODEL, common_pb2.MODEL_KIND_CHAT))
    )


@dataclass
class Stack:
    """A gateway in this process over four in-process services, three of them faulty."""

    gateway: GatewayService
    services: dict[str, MicroService]
    faults: dict[str, Faults]

    @property
    def url(self) -> str:
        return self.gateway.rest.url


@asynccontextmanager
async def faulty_stack(
    client: ClientConfig | None = None,
    servers: dict[str, ServerConfig] | None = None,
    **settings: object,
) -> AsyncIterator[Stack]:
    """embedding, rerank and chat with :class:`Faults` (all OK at first), trivial retrieval, and
    a gateway over them built with ``settings`` (``OPEA_GATEWAY_*`` fields). ``servers`` gives
    a service a server config of its own (by name)."""
    faults = {name: Faults() for name in ("embedding", "rerank", "chat")}
    server = {
        name: (servers or {}).get(name, LOOPBACK)
        for name in ("embedding", "retrieval", "rerank", "chat")
    }
    services = {
        "embedding": embedding(faults["embedding"], server["embedding"]),
        "retrieval": trivial.retrieval(server["retrieval"]),
        "rerank": rerank(faults["rerank"], server["rerank"]),
        "chat": chat(faults["chat"], server["chat"]),
    }
    async with AsyncExitStack() as stack:
        for service in services.values():
            await stack.enter_async_context(started(service))
        targets = {name: s.target for name, s in services.items()}
        config = GatewaySettings(rest_port=0, cache_size=0, **{**targets, **settings})
        gw = build_gateway(LOOPBACK, config, client)
        await gw.start()
        stack.push_async_callback(gw.stop, 0)
        try:
            yield Stack(gw, services, faults)
        finally:
            for f in faults.values():
                f.released.set()  # nothing hangs past the test
