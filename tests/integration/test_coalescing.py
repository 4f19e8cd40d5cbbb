"""EmbedCoalescer against a real embedding service: which calls leave, and what each caller gets.

The service is the built-in embedding servicer on loopback, over a recording backend (the
hashing embedder behind the ``Embedder`` Protocol) that notes the texts of each call and can hold
a call until the test lets it go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest

from opea_grpc.client import EmbeddingClient
from opea_grpc.coalescing import EmbedCoalescer
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import embedding_pb2, embedding_pb2_grpc
from opea_grpc.server import MicroService, ServiceType
from opea_grpc.testing import started
from services.embedding.backend import Embeddings, ModelInfo
from services.embedding.hashing import HashingEmbedder
from services.embedding.servicer import EmbeddingServicer


@dataclass
class Recording:
    """The hashing embedder, noting each call's texts; ``hold`` keeps calls waiting."""

    inner: HashingEmbedder = field(default_factory=lambda: HashingEmbedder(dimensions=16))
    calls: list[list[str]] = field(default_factory=list)
    hold: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def embed(self, texts: Sequence[str], *, user: str = "") -> Embeddings:
        self.calls.append(list(texts))
        self.entered.set()
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return await self.inner.embed(texts, user=user)


@dataclass(frozen=True)
class Setup:
    backend: Recording
    client: EmbeddingClient


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    backend = Recording()
    service = MicroService(
        "embedding", service_type=ServiceType.EMBEDDING, config=ServerConfig(port=0, grace=0.5)
    ).add_service(
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
        EmbeddingServicer(backend, max_inputs=64, max_input_chars=1000),
        ready=backend.ready,
    )
    service.on_start(backend.start).on_stop(backend.close)
    # No retries: a status reaches the coalescer as the service answered it.
    async with started(service, ClientConfig(max_attempts=1, health_check=False)) as channel:
        yield Setup(backend, EmbeddingClient(channel))


def ask(text: str, **fields: object) -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(input=[text], **fields)  # type: ignore[arg-type]


def vector(reply: embedding_pb2.EmbedResponse) -> list[float]:
    assert [item.index for item in reply.data] == [0]
    return list(reply.data[0].embedding)


async def test_texts_asked_together_share_one_call(setup: Setup) -> None:
    embed = EmbedCoalescer(setup.client.embed)
    texts = [f"question number {i}" for i in range(5)]
    replies = await asyncio.gather(*(embed(ask(t), timeout=5) for t in texts))
    assert setup.backend.calls == [texts]
    assert (embed.calls, embed.requests) == (1, 5)
    for text, reply in zip(texts, replies, strict=True):
        alone = await setup.client.embed(ask(text), timeout=5)
        assert vector(reply) == pytest.approx(vector(alone))
        assert reply.model == alone.model


async def test_a_lone_call_goes_as_it_is(setup: Setup) -> None:
    embed = EmbedCoalescer(setup.client.embed)
    reply = await embed(ask("just one"), timeout=5)
    assert setup.backend.calls == [["just one"]]
    assert reply.usage.prompt_tokens > 0  # the service's own reply, usage included


async def test_the_same_text_is_sent_once(setup: Setup) -> None:
    embed = EmbedCoalescer(setup.client.embed)
    a1, b, a2 = await asyncio.gather(*(embed(ask(t), timeout=5) for t in ("a", "b", "a")))
    assert setup.backend.calls == [["a", "b"]]
    assert vector(a1) == vector(a2) != vector(b)


async def test_calls_differing_beyond_the_text_are_not_merged(setup: Setup) -> None:
    embed = EmbedCoalescer(setup.client.embed)
    await asyncio.gather(
        embed(ask("x", user="u1"), timeout=5),
        embed(ask("y", user="u2"), timeout=5),
        embed(ask("z", user="u1"), timeout=5),
        embed(ask("w", user="u1", dimensions=8), timeout=5),
    )
    assert sorted(setup.backend.calls) == [["w"], ["x", "z"], ["y"]]


async def test_a_batch_holds_at_most_max_inputs(setup: Setup) -> None:
    embed = EmbedCoalescer(setup.client.embed, max_inputs=2)
    await asyncio.gather(*(embed(ask(f"t{i}"), timeout=5) for i in range(5)))
    assert setup.backend.calls == [["t0", "t1"], ["t2", "t3"], ["t4"]]


async def test_one_bad_text_fails_only_its_caller(setup: Setup) -> None:
    embed = EmbedCoalescer(setup.client.embed)
    good, bad, fine = await asyncio.gather(
        embed(ask("good"), timeout=5),
        embed(ask(""), timeout=5),
        embed(ask("fine"), timeout=5),
        return_exceptions=True,
    )
    assert isinstance(bad, grpc.aio.AioRpcError)
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "input[0] is an empty string" in (bad.details() or "")  # its own index, not the batch's
    assert isinstance(good, embedding_pb2.EmbedResponse)
    assert isinstance(fine, embedding_pb2.EmbedResponse)
    assert setup.backend.calls == [["good"], ["fine"]]  # the merged call never reached it
    assert embed.calls == 4  # the merged one, then each text alone


async def test_a_failure_of_the_call_reaches_every_caller_once(setup: Setup) -> None:
    embed = EmbedCoalescer(setup.client.embed)
    results = await asyncio.gather(
        *(embed(ask(t, model="no-such-model"), timeout=5) for t in ("a", "b")),
        return_exceptions=True,
    )
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() is grpc.StatusCode.NOT_FOUND
    assert embed.calls == 1  # not a text's fault: not asked again text by text


async def test_each_caller_keeps_its_own_deadline(setup: Setup) -> None:
    setup.backend.hold = asyncio.Event()
    embed = EmbedCoalescer(setup.client.embed)
    hasty = asyncio.ensure_future(embed(ask("hasty"), timeout=0.2))
    patient = asyncio.ensure_future(embed(ask("patient"), timeout=30))
    with pytest.raises(ServiceError) as failed:
        await hasty
    assert failed.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not patient.done()
    setup.backend.hold.set()
    assert vector(await patient)
    assert setup.backend.calls == [["hasty", "patient"]]


async def test_callers_that_leave_cancel_the_call(setup: Setup) -> None:
    setup.backend.hold = asyncio.Event()
    embed = EmbedCoalescer(setup.client.embed)
    callers = [asyncio.ensure_future(embed(ask(t), timeout=30)) for t in ("a", "b")]
    await asyncio.wait_for(setup.backend.entered.wait(), 10)
    callers[0].cancel()
    await asyncio.sleep(0)
    assert not setup.backend.cancelled.is_set()  # one caller still waits
    callers[1].cancel()
    await asyncio.wait_for(setup.backend.cancelled.wait(), 10)  # seen by the service
    assert all(c.cancelled() for c in callers)


async def test_max_inputs_one_sends_each_request(setup: Setup) -> None:
    embed = EmbedCoalescer(setup.client.embed, max_inputs=1)
    await asyncio.gather(*(embed(ask(t), timeout=5) for t in ("a", "b")))
    assert sorted(setup.backend.calls) == [["a"], ["b"]]
    with pytest.raises(ValueError, match="max_inputs"):
        EmbedCoalescer(setup.client.embed, max_inputs=0)
