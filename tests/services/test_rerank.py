"""The rerank service over real gRPC: the contract on every backend that runs here, then the
lexical backend's ranking, the upstream backend's wire shapes and error mapping, and the
service as a process."""

from __future__ import annotations

import dataclasses
import random
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opea_grpc.channel import connect
from opea_grpc.client import ModelClient, RerankClient
from opea_grpc.config import ClientConfig, ConfigError, ServerConfig
from opea_grpc.pb.v1 import common_pb2, rerank_pb2
from opea_grpc.retry import RetryBudget
from opea_grpc.testing import started
from services import bm25
from services.rerank.backend import make_backend
from services.rerank.service import Settings, build
from tests.openai_fake import FakeOpenAI
from tests.processes import health, served

BACKENDS = ["lexical", "openai-cohere", "openai-tei"]
SERVICE = RerankClient.SERVICE
#: For error tests: one attempt, so the status seen is the one the service answered.
NO_RETRY = ClientConfig(max_attempts=1, health_check=False)

PASSAGES = [
    "The weather in the mountains changes quickly in spring.",
    "Python is a programming language with a large standard library.",
    "Bananas and apples are sold at the market on Saturdays.",
    "The Eiffel Tower is the best known landmark of Paris, the capital of France.",
    "Trains leave the central station every twenty minutes.",
]
QUERY = "Which city is the capital of France?"


def documents(*texts: str) -> list[common_pb2.Document]:
    return [common_pb2.Document(id=f"d{i}", text=t) for i, t in enumerate(texts)]


def rerank_request(
    query: str = QUERY, texts: list[str] = PASSAGES, top_n: int | None = None, model: str = ""
) -> rerank_pb2.RerankRequest:
    return rerank_pb2.RerankRequest(
        query=query, documents=documents(*texts), top_n=top_n, model=model
    )


def settings_for(kind: str, base_url: str = "", **overrides: object) -> Settings:
    match kind:
        case "lexical":
            settings = Settings()  # needs no upstream: base_url is ignored
        case "openai-cohere" | "openai-tei":
            api = kind.removeprefix("openai-")
            settings = Settings(
                backend="openai", base_url=base_url, model="rerank-model", api=api, backoff=0.01
            )
        case _:
            raise AssertionError(kind)
    return dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]


@asynccontextmanager
async def running(
    settings: Settings, client_config: ClientConfig | None = None
) -> AsyncIterator[RerankClient]:
    service = build(ServerConfig(host="127.0.0.1", port=0), settings)
    async with started(service, client_config) as channel:
        yield RerankClient(channel, timeout=10, retry_budget=RetryBudget(reserve=0))


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(model="rerank-model") as server:
        yield server


@pytest.fixture(params=BACKENDS)
async def client(request: pytest.FixtureRequest) -> AsyncIterator[RerankClient]:
    async with AsyncExitStack() as stack:
        base_url = ""
        if request.param != "lexical":
            fake = await stack.enter_async_context(FakeOpenAI(model="rerank-model"))
            base_url = fake.base_url
        yield await stack.enter_async_context(running(settings_for(request.param, base_url)))


async def rejected(client: RerankClient, req: rerank_pb2.RerankRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.rerank(req)
    return info.value


# -- the contract, on every backend ------------------------------------------------------------


async def test_results_best_first_and_mapped_to_request_positions(client: RerankClient) -> None:
    req = rerank_request()
    response = await client.rerank(req)
    assert sorted(r.index for r in response.results) == list(range(len(PASSAGES)))
    for result in response.results:
        assert result.document == req.documents[result.index]
    scores = [r.relevance_score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    assert response.results[0].index == 3  # the only passage about the capital of France
    models = await ModelClient(client.channel).list_models()
    assert [m.id for m in models.models] == [response.model]
    assert models.models[0].kind == common_pb2.MODEL_KIND_RERANK


@pytest.mark.parametrize(("top_n", "expected"), [(1, 1), (3, 3), (50, len(PASSAGES))])
async def test_top_n_keeps_the_best(client: RerankClient, top_n: int, expected: int) -> None:
    everything = await client.rerank(rerank_request())
    best = await client.rerank(rerank_request(top_n=top_n))
    assert len(best.results) == expected
    assert [r.index for r in best.results] == [r.index for r in everything.results][:expected]


async def test_the_served_model_may_be_named(client: RerankClient) -> None:
    model = (await client.rerank(rerank_request())).model
    assert (await client.rerank(rerank_request(model=model))).model == model


BAD: list[tuple[str, rerank_pb2.RerankRequest, grpc.StatusCode, str]] = [
    ("no query", rerank_request(query=""), grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
    ("blank query", rerank_request(query="  \n"), grpc.StatusCode.INVALID_ARGUMENT,
     "query is empty"),
    ("no documents", rerank_request(texts=[]), grpc.StatusCode.INVALID_ARGUMENT,
     "documents is empty"),
    ("blank document", rerank_request(texts=["fine", " "]), grpc.StatusCode.INVALID_ARGUMENT,
     "documents[1].text is empty"),
    ("top_n 0", rerank_request(top_n=0), grpc.StatusCode.INVALID_ARGUMENT,
     "top_n must be >= 1, got 0"),
    ("top_n < 0", rerank_request(top_n=-3), grpc.StatusCode.INVALID_ARGUMENT,
     "top_n must be >= 1, got -3"),
    ("model", rerank_request(model="gpt-9"), grpc.StatusCode.NOT_FOUND,
     "'gpt-9' is not served here"),
]  # fmt: skip


@pytest.mark.parametrize(("req", "code", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_input_is_refused_saying_what_to_fix(
    client: RerankClient, req: rerank_pb2.RerankRequest, code: grpc.StatusCode, words: str
) -> None:
    error = await rejected(client, req)
    assert error.code() is code
    assert words in (error.details() or "")


@pytest.mark.parametrize("kind", BACKENDS)
async def test_too_many_documents_names_the_limit(kind: str, fake: FakeOpenAI) -> None:
    async with running(settings_for(kind, fake.base_url, max_documents=3)) as client:
        await client.rerank(rerank_request("q", ["a", "b", "c"]))
        error = await rejected(client, rerank_request("q", ["a", "b", "c", "d"]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "4 given, at most 3" in (error.details() or "")
    assert "OPEA_RERANK_MAX_DOCUMENTS" in (error.details() or "")


# -- lexical: BM25 fused with the incoming order -----------------------------------------------

FILLER = [
    f"Passage {n} talks about gardening, soil and the watering of tomato plants." for n in range(9)
]


async def test_lexical_lifts_a_passage_with_strong_evidence() -> None:
    texts = [*FILLER, "Reciprocal rank fusion combines the rankings of several retrievers."]
    async with running(Settings()) as client:
        response = await client.rerank(
            rerank_request("how does rank fusion combine rankings", texts)
        )
    assert response.results[0].index == 9  # last in, first out
    assert [r.index for r in response.results[1:]] == list(range(9))  # the rest keep their order
    # fused score: incoming rank 10 (weighted) and BM25 rank 1 (k = 60)
    w = Settings().incoming_weight
    assert response.results[0].relevance_score == pytest.approx(w / 70 + 1 / 61, rel=1e-6)
    assert response.results[1].relevance_score == pytest.approx(w / 61, rel=1e-6)


async def test_lexical_incoming_weight_sets_how_far_lexical_evidence_lifts() -> None:
    # The evidence sits at incoming rank 3: plain RRF (weight 1) lifts it to the top, a heavy
    # weight on the incoming order keeps it where it was.
    texts = [*FILLER[:2], "Reciprocal rank fusion combines rankings.", *FILLER[2:]]
    query = "how does rank fusion combine rankings"
    heavy = Settings(incoming_weight=200.0)
    async with running(Settings(incoming_weight=1.0)) as plain, running(heavy) as weighted:
        lifted = await plain.rerank(rerank_request(query, texts))
        kept = await weighted.rerank(rerank_request(query, texts))
    assert [r.index for r in lifted.results][:3] == [2, 0, 1]
    assert [r.index for r in kept.results] == list(range(len(texts)))


@pytest.mark.parametrize(
    ("query", "texts"),
    [
        ("submarine periscope", FILLER),  # no passage shares a term with the query
        ("gardening", FILLER),  # every passage shares it equally
        ("the of and", FILLER),  # stopwords only: no terms at all
    ],
)
async def test_lexical_keeps_the_incoming_order_without_evidence(
    query: str, texts: list[str]
) -> None:
    async with running(Settings()) as client:
        response = await client.rerank(rerank_request(query, texts))
    assert [r.index for r in response.results] == list(range(len(texts)))


async def test_lexical_matches_inflected_forms() -> None:
    texts = ["A note about weather.", "The passage was indexed and ranked.", "Nothing here."]
    async with running(Settings()) as client:
        response = await client.rerank(rerank_request("indexing passages", texts))
    assert response.results[0].index == 1


async def test_lexical_usage_counts_words_of_query_and_documents() -> None:
    async with running(Settings()) as client:
        response = await client.rerank(rerank_request())
    words = len(bm25.words(QUERY)) + sum(len(bm25.words(t)) for t in PASSAGES)
    assert response.usage.prompt_tokens == response.usage.total_tokens == words
    assert response.model == "bm25-rrf"


async def test_lexical_scores_large_requests_off_the_loop_with_the_same_result() -> None:
    texts = [*FILLER, "Reciprocal rank fusion combines the rankings of several retrievers."]
    req = rerank_request("rank fusion", texts, top_n=4)
    async with running(Settings()) as inline, running(Settings(offload_chars=0)) as threaded:
        assert await threaded.rerank(req) == await inline.rerank(req)


def test_the_word_splitter_agrees_with_its_regular_expression() -> None:
    # bm25.words takes a faster path than WORD.findall(text.lower()); it must find the same.
    rng = random.Random(11)
    alphabet = (
        "abcXYZ019 _-.,;:!?'\"\u201c\u201d\u2019\u2014\t\n\x00é\u0130Σ²中\U0001f600\u00a0\u200b"
    )
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert bm25.words(text) == bm25.WORD.findall(text.lower()), repr(text)


# -- openai: the upstream's wire shapes and failures -------------------------------------------


async def test_cohere_shape_on_the_wire(fake: FakeOpenAI) -> None:
    async with running(settings_for("openai-cohere", fake.base_url)) as client:
        response = await client.rerank(rerank_request(top_n=2))
    path, body = [(p, b) for p, b in fake.requests if p != "/v1/models"][-1]
    assert path == "/v1/rerank"
    assert body == {"model": "rerank-model", "query": QUERY, "documents": PASSAGES, "top_n": 2}
    assert response.usage.total_tokens == sum(len(bm25.words(t)) for t in PASSAGES)


async def test_tei_shape_on_the_wire_and_top_n_applied_here(fake: FakeOpenAI) -> None:
    async with running(settings_for("openai-tei", fake.base_url)) as client:
        response = await client.rerank(rerank_request(top_n=2))
    path, body = [(p, b) for p, b in fake.requests if p != "/v1/models"][-1]
    assert path == "/rerank"
    assert body == {"query": QUERY, "texts": PASSAGES}
    assert [r.index for r in response.results][:1] == [3]
    assert len(response.results) == 2
    assert response.usage.total_tokens == 0  # TEI reports none: 0 means unknown


@pytest.mark.parametrize("kind", ["openai-cohere", "openai-tei"])
@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ((429, 429), grpc.StatusCode.RESOURCE_EXHAUSTED),  # still 429 after the one retry
        ((400,), grpc.StatusCode.INVALID_ARGUMENT),
        ((404,), grpc.StatusCode.NOT_FOUND),
        ((500,), grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_upstream_errors_map_to_status_codes(
    fake: FakeOpenAI, kind: str, statuses: tuple[int, ...], code: grpc.StatusCode
) -> None:
    settings = settings_for(kind, fake.base_url, max_retries=1)
    async with running(settings, NO_RETRY) as client:
        fake.fail(*statuses)
        error = await rejected(client, rerank_request())
    assert error.code() is code
    assert f"HTTP {statuses[-1]}" in (error.details() or "")


async def test_a_429_is_retried_until_the_upstream_answers(fake: FakeOpenAI) -> None:
    async with running(settings_for("openai-cohere", fake.base_url, max_retries=2)) as client:
        fake.fail(429, 429)
        response = await client.rerank(rerank_request())
    assert response.results[0].index == 3
    assert sum(1 for path, _ in fake.requests if path == "/v1/rerank") == 3


def closed_port() -> tuple[socket.socket, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["openai-cohere", "openai-tei"])
async def test_upstream_down_is_unavailable_and_not_serving(kind: str) -> None:
    sock, url = closed_port()
    with sock:
        async with running(settings_for(kind, url, max_retries=0), NO_RETRY) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            error = await rejected(client, rerank_request())
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in (error.details() or "")


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"backend": "neural"}, "choose one of lexical, openai"),
        ({"backend": "openai", "model": "m"}, "OPEA_RERANK_BASE_URL"),
        ({"backend": "openai", "base_url": "http://x"}, "OPEA_RERANK_MODEL is required"),
        ({"api": "grpc"}, "OPEA_RERANK_API"),
        ({"b": 2.0}, "OPEA_RERANK_B"),
        ({"max_documents": 0}, "OPEA_RERANK_MAX_DOCUMENTS"),
        ({"model": "bge"}, "backend lexical serves bm25-rrf"),
    ],
)
def test_bad_settings_name_the_variable(settings: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        make_backend(Settings(**settings))  # type: ignore[arg-type]


# -- the process -------------------------------------------------------------------------------


async def test_python_m_services_rerank_serves_and_stops_on_sigterm(
    subprocess_env: dict[str, str],
) -> None:
    argv = ["-m", "services.rerank", "--port", "0", "--host", "127.0.0.1"]
    async with served(subprocess_env, *argv) as child:
        assert "rerank listening on 127.0.0.1:" in child.line
        probe = await health(subprocess_env, child.target, SERVICE)
        assert probe.code == 0, probe
        channel = connect(child.target, [SERVICE])
        try:
            response = await RerankClient(channel).rerank(rerank_request(top_n=1))
        finally:
            await channel.close(None)
        assert (response.model, response.results[0].index) == ("bm25-rrf", 3)
        assert await child.stop() == 0
