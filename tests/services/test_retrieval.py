"""Contract of ``opea.v1.RetrievalService``, over real gRPC, for every backend that runs here.

Every test takes the ``retrieval`` fixture: a started service over an empty store of the backend
named by ``backend_settings``'s parameter, and a client. To add a backend, append its name to
:data:`BACKENDS` and add a ``case`` to :func:`settings_for` returning its :class:`Settings`; a
backend that needs a server (``pgvector``: ``tests.services.pg.PostgresServer``) gets it from a
session fixture through ``request.getfixturevalue``. The fixture empties the store through the
API (DeleteCollection of every collection) before each test, so a shared database is fine.

Filter semantics (one table, :data:`FILTER_CASES`) are written out by hand: every backend must
give exactly these ids, and the shared reference :func:`services.retrieval.filters.matches`
must agree with them too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opea_grpc.channel import connect
from opea_grpc.client import ModelClient, RetrievalClient
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.pb.v1 import common_pb2, retrieval_pb2
from opea_grpc.server import MicroService
from opea_grpc.structs import struct_to_dict
from opea_grpc.testing import wait_for_serving
from services.retrieval.backend import JSON
from services.retrieval.filters import Condition, Op, matches
from services.retrieval.service import Settings, build

BACKENDS = ["local"]
SERVICE = RetrievalClient.SERVICE
#: One attempt, no health gating: the status seen is the one the service answered.
NO_RETRY = ClientConfig(max_attempts=1, health_check=False)
OPS = {op.name: op for op in Op}


def settings_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The Settings of backend ``kind`` over an empty store."""
    match kind:
        case "local":
            return Settings(backend="local", data_dir=str(tmp_path / "index"))
        case _:
            raise AssertionError(f"no settings for backend {kind!r}: add a case here")


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    return settings_for(request.param, request, tmp_path)


@dataclass(frozen=True)
class Retrieval:
    service: MicroService
    client: RetrievalClient
    channel: grpc.aio.Channel
    settings: Settings


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Retrieval]:
    """The service over ``settings``, serving, with every collection dropped."""
    service = build(ServerConfig(host="127.0.0.1", port=0), settings)
    await service.start()
    channel = connect(service.target, [SERVICE], NO_RETRY)
    try:
        await wait_for_serving(channel, SERVICE)
        client = RetrievalClient(channel)
        for collection in (await client.list_collections()).collections:
            await client.delete_collection(collection.name)
        yield Retrieval(service, client, channel, settings)
    finally:
        await channel.close(None)
        await service.stop(0)


@pytest.fixture
async def retrieval(backend_settings: Settings) -> AsyncIterator[Retrieval]:
    async with running(backend_settings) as r:
        yield r


# -- helpers ----------------------------------------------------------------------------------


def value(v: JSON) -> struct_pb2.Value:
    holder = struct_pb2.Struct()
    holder.update({"v": v})
    return holder.fields["v"]


def cond(key: str, op: str | int, v: JSON = None) -> common_pb2.Condition:
    operator = op if isinstance(op, int) else common_pb2.Operator.Value(f"OPERATOR_{op}")
    c = common_pb2.Condition(key=key, operator=operator)  # type: ignore[arg-type]
    if v is not None:
        c.value.CopyFrom(value(v))
    return c


def where(*conditions: common_pb2.Condition) -> common_pb2.Filter:
    return common_pb2.Filter(conditions=conditions)


def doc(
    id_: str, embedding: Sequence[float], text: str = "", /, **metadata: JSON
) -> common_pb2.Document:
    d = common_pb2.Document(id=id_, text=text or f"document {id_}", embedding=embedding)
    d.metadata.update(metadata)
    return d


def unit(*xs: float) -> list[float]:
    norm = math.sqrt(sum(x * x for x in xs))
    return [x / norm for x in xs]


async def upsert(r: Retrieval, *docs: common_pb2.Document, collection: str = "") -> int:
    reply = await r.client.upsert(
        retrieval_pb2.UpsertRequest(collection=collection, documents=docs)
    )
    return reply.upserted_count


async def search(r: Retrieval, **fields: object) -> list[common_pb2.ScoredDocument]:
    reply = await r.client.search(retrieval_pb2.SearchRequest(**fields))  # type: ignore[arg-type]
    return list(reply.documents)


def ids(found: Sequence[common_pb2.ScoredDocument]) -> list[str]:
    return [d.document.id for d in found]


async def counts(r: Retrieval) -> dict[str, tuple[int, int]]:
    reply = await r.client.list_collections()
    return {c.name: (c.dimensions, c.document_count) for c in reply.collections}


def to_dict(struct: struct_pb2.Struct) -> dict[str, JSON]:
    return struct_to_dict(struct)


# Vectors at known angles from the query X = (1, 0, 0): cosines 1, 0.8, 0.6, 0, -1.
X = [1.0, 0.0, 0.0]
NEAR = {
    "a": ([1.0, 0.0, 0.0], 1.0),
    "b": ([0.8, 0.6, 0.0], 0.8),
    "c": ([0.6, 0.0, 0.8], 0.6),
    "d": ([0.0, 1.0, 0.0], 0.0),
    "e": ([-2.0, 0.0, 0.0], -1.0),  # not unit: the index normalises
}


async def seed_near(r: Retrieval, collection: str = "") -> None:
    docs = [doc(k, v, f"text of {k}", k=k, n=i) for i, (k, (v, _)) in enumerate(NEAR.items())]
    assert await upsert(r, *docs, collection=collection) == len(NEAR)


# -- search, upsert, delete -------------------------------------------------------------------


async def test_upsert_then_search_ranks_by_cosine(retrieval: Retrieval) -> None:
    await seed_near(retrieval)
    found = await search(retrieval, vector=X, top_k=4)
    assert ids(found) == ["a", "b", "c", "d"]
    for hit in found:
        assert hit.score == pytest.approx(NEAR[hit.document.id][1], abs=1e-5)
        assert hit.document.text == f"text of {hit.document.id}"
        assert to_dict(hit.document.metadata)["k"] == hit.document.id
        assert not hit.document.embedding  # results carry no embedding
    assert await counts(retrieval) == {"default": (3, 5)}
    # top_k 0 is the default (10 > 5 documents): all of them, best first
    assert ids(await search(retrieval, vector=X)) == ["a", "b", "c", "d", "e"]


async def test_metadata_round_trips(retrieval: Retrieval) -> None:
    meta: dict[str, JSON] = {
        "title": "Été",
        "page": 3,
        "ratio": 0.25,
        "draft": False,
        "tags": ["x", 1, True, None],
        "source": {"name": "wiki", "nested": {"deep": [1.5]}},
        "none": None,
    }
    await upsert(retrieval, doc("m", X, "some text", **meta))
    (hit,) = await search(retrieval, vector=X, top_k=1)
    assert to_dict(hit.document.metadata) == meta


async def test_upsert_is_idempotent_by_id(retrieval: Retrieval) -> None:
    await seed_near(retrieval)
    # "a" moves away from X and gets new text and metadata
    assert await upsert(retrieval, doc("a", [0.0, 0.0, 1.0], "new text", version=2)) == 1
    assert await upsert(retrieval, doc("a", [0.0, 0.0, 1.0], "new text", version=2)) == 1
    assert await counts(retrieval) == {"default": (3, 5)}
    found = await search(retrieval, vector=X, top_k=5)
    assert ids(found)[:2] == ["b", "c"]
    (a,) = [h for h in found if h.document.id == "a"]
    assert a.document.text == "new text"
    assert to_dict(a.document.metadata) == {"version": 2}
    assert a.score == pytest.approx(0.0, abs=1e-5)
    found = await search(retrieval, vector=[0.0, 0.0, 1.0], top_k=1)
    assert ids(found) == ["a"]


async def test_delete_by_ids(retrieval: Retrieval) -> None:
    await seed_near(retrieval)
    reply = await retrieval.client.delete(retrieval_pb2.DeleteRequest(ids=["a", "c", "zz"]))
    assert reply.deleted_count == 2  # "zz" never existed
    assert ids(await search(retrieval, vector=X, top_k=10)) == ["b", "d", "e"]
    assert await counts(retrieval) == {"default": (3, 3)}
    reply = await retrieval.client.delete(retrieval_pb2.DeleteRequest(ids=["a"]))
    assert reply.deleted_count == 0


async def test_delete_by_filter_and_ids(retrieval: Retrieval) -> None:
    await seed_near(retrieval)
    reply = await retrieval.client.delete(
        retrieval_pb2.DeleteRequest(filter=where(cond("n", "GTE", 3)))
    )
    assert reply.deleted_count == 2  # d (n=3), e (n=4)
    assert ids(await search(retrieval, vector=X, top_k=10)) == ["a", "b", "c"]
    # ids and filter: the union
    reply = await retrieval.client.delete(
        retrieval_pb2.DeleteRequest(ids=["a"], filter=where(cond("k", "EQ", "c")))
    )
    assert reply.deleted_count == 2
    assert ids(await search(retrieval, vector=X, top_k=10)) == ["b"]


async def test_filter_applies_before_ranking(retrieval: Retrieval) -> None:
    await seed_near(retrieval)
    found = await search(retrieval, vector=X, top_k=2, filter=where(cond("k", "NOT_IN", ["a"])))
    assert ids(found) == ["b", "c"]  # two results although the nearest one is filtered out


async def test_score_threshold(retrieval: Retrieval) -> None:
    await seed_near(retrieval)
    assert ids(await search(retrieval, vector=X, top_k=10, score_threshold=0.7)) == ["a", "b"]
    assert ids(await search(retrieval, vector=X, top_k=10, score_threshold=0.0)) == [
        "a",
        "b",
        "c",
        "d",
    ]
    assert await search(retrieval, vector=X, top_k=10, score_threshold=1.5) == []


# -- lexical and hybrid -----------------------------------------------------------------------

# The query vector Q is nearest to "decoy"; only "answer" contains the query's rare word.
Q = unit(1.0, 0.0, 0.0, 0.0)
HYBRID_DOCS = [
    ("decoy", unit(1.0, 0.10, 0.0, 0.0), "A guide to garden tools and their care."),
    ("answer", unit(1.0, 0.25, 0.0, 0.0), "The zeppelin hangar houses an airship and tools."),
    ("far1", unit(0.0, 1.0, 0.0, 0.0), "Cooking rice needs water and patience."),
    ("far2", unit(0.0, 0.0, 1.0, 0.0), "Rivers flow downhill to the sea."),
    ("far3", unit(0.0, 0.0, 0.0, 1.0), "Mountains rise above the clouds in spring."),
]


async def seed_hybrid(r: Retrieval) -> None:
    await upsert(r, *(doc(i, v, t) for i, v, t in HYBRID_DOCS))


async def test_hybrid_beats_dense_when_the_word_decides(retrieval: Retrieval) -> None:
    await seed_hybrid(retrieval)
    dense = await search(retrieval, vector=Q, top_k=5)
    assert ids(dense)[:2] == ["decoy", "answer"]
    hybrid = await search(retrieval, vector=Q, query="zeppelin", top_k=2)
    assert ids(hybrid) == ["answer", "decoy"]
    # z-score fusion, equal weights, over the 5 candidates: only "answer" has the word, so its
    # lexical z-score is 2 and every other one -0.5 (whatever the engine's score scale).
    cosine = {h.document.id: h.score for h in dense}
    values = [cosine[i] for i, _, _ in HYBRID_DOCS]
    mean = sum(values) / 5
    spread = (sum((v - mean) ** 2 for v in values) / 5) ** 0.5
    z = {i: (cosine[i] - mean) / spread for i, _, _ in HYBRID_DOCS}
    assert hybrid[0].score == pytest.approx(0.5 * z["answer"] + 0.5 * 2.0, rel=1e-4)
    assert hybrid[1].score == pytest.approx(0.5 * z["decoy"] + 0.5 * -0.5, rel=1e-4)


async def test_hybrid_by_reciprocal_rank_fusion(backend_settings: Settings) -> None:
    settings = dataclasses.replace(backend_settings, fusion="rrf")
    async with running(settings) as retrieval:
        await seed_hybrid(retrieval)
        hybrid = await search(retrieval, vector=Q, query="zeppelin", top_k=2)
    assert ids(hybrid) == ["answer", "decoy"]
    # k = 60: answer is 2nd dense and 1st lexical, decoy 1st dense only
    k = settings.rrf_k
    assert hybrid[0].score == pytest.approx(1 / (k + 2) + 1 / (k + 1), rel=1e-5)
    assert hybrid[1].score == pytest.approx(1 / (k + 1), rel=1e-5)


async def test_lexical_only_without_vector(retrieval: Retrieval) -> None:
    await seed_hybrid(retrieval)
    found = await search(retrieval, query="tools", top_k=10)
    assert sorted(ids(found)) == ["answer", "decoy"]  # only documents with the word
    assert all(h.score > 0 for h in found)
    assert found[0].score >= found[1].score
    # stemming: "airships" finds "airship"; punctuation and case do not matter
    assert ids(await search(retrieval, query="AIRSHIPS?!", top_k=10)) == ["answer"]
    # operators of the lexical engine are plain words, never syntax
    assert ids(await search(retrieval, query='zeppelin" OR NEAR(', top_k=10)) == ["answer"]
    assert await search(retrieval, query="absent-word", top_k=10) == []


async def test_lexical_search_filters(retrieval: Retrieval) -> None:
    await upsert(
        retrieval,
        doc("p1", X, "solar panels on the roof", lang="en"),
        doc("p2", X, "solar panels auf dem Dach", lang="de"),
    )
    found = await search(retrieval, query="solar", filter=where(cond("lang", "EQ", "de")))
    assert ids(found) == ["p2"]


# -- filters ----------------------------------------------------------------------------------

FILTER_DOCS: dict[str, dict[str, JSON]] = {
    "f0": {"year": 2020, "lang": "en", "score": 0.5, "draft": False, "source": {"name": "wiki"}},
    "f1": {"year": 2021, "lang": "de", "score": 1.5, "draft": True, "source": {"name": "web"}},
    "f2": {"year": 2022.5, "lang": "en", "source": "flat"},
    "f3": {"year": "2021", "lang": "EN", "draft": 1},
    "f4": {},
    "f5": {"year": None, "lang": ["en"], "source": {"name": {"deep": "x"}}},
}

#: (key, operator, value) -> the ids that match, by the rules in services.retrieval.filters.
FILTER_CASES: list[tuple[str, str, JSON, set[str]]] = [
    ("year", "EQ", 2021, {"f1"}),
    ("year", "EQ", 2021.0, {"f1"}),
    ("year", "EQ", "2021", {"f3"}),
    ("draft", "EQ", True, {"f1"}),
    ("draft", "EQ", 1, {"f3"}),
    ("draft", "EQ", False, {"f0"}),
    ("lang", "EQ", "en", {"f0", "f2"}),
    ("lang", "NE", "en", {"f1", "f3", "f4", "f5"}),
    ("year", "GT", 2020, {"f1", "f2"}),
    ("year", "GTE", 2021, {"f1", "f2"}),
    ("year", "LT", 2021.5, {"f0", "f1"}),
    ("year", "LTE", 2020, {"f0"}),
    ("score", "LTE", 0.5, {"f0"}),
    ("lang", "GT", "de", {"f0", "f2"}),  # "EN" < "de" by code point
    ("lang", "LT", "en", {"f1", "f3"}),
    ("lang", "IN", ["en", "de"], {"f0", "f1", "f2"}),
    ("lang", "NOT_IN", ["en"], {"f1", "f3", "f4", "f5"}),
    ("year", "IN", [2020, 2022.5, "2021"], {"f0", "f2", "f3"}),
    ("year", "IN", [], set()),
    ("year", "NOT_IN", [], {"f0", "f1", "f2", "f3", "f4", "f5"}),
    ("source.name", "EQ", "wiki", {"f0"}),
    ("source.name", "NE", "wiki", {"f1", "f2", "f3", "f4", "f5"}),
    ("source.name.deep", "EQ", "x", {"f5"}),
    ("source.name", "IN", ["wiki", "web"], {"f0", "f1"}),
    ("missing", "NE", 1, {"f0", "f1", "f2", "f3", "f4", "f5"}),
    ("missing", "GT", 0, set()),
]


@pytest.mark.parametrize(
    ("key", "op", "v", "expected"),
    FILTER_CASES,
    ids=[f"{k} {o} {v!r}" for k, o, v, _ in FILTER_CASES],
)
def test_reference_filter_semantics(key: str, op: str, v: JSON, expected: set[str]) -> None:
    c = Condition(key, OPS[op], tuple(v) if isinstance(v, list) else v)  # type: ignore[arg-type]
    assert {i for i, m in FILTER_DOCS.items() if matches(m, [c])} == expected


async def test_every_filter_case(retrieval: Retrieval) -> None:
    await upsert(retrieval, *(doc(i, X, "", **m) for i, m in FILTER_DOCS.items()))
    failures = []
    for key, op, v, expected in FILTER_CASES:
        found = set(
            ids(await search(retrieval, vector=X, top_k=100, filter=where(cond(key, op, v))))
        )
        if found != expected:
            failures.append(f"{key} {op} {v!r}: got {sorted(found)}, want {sorted(expected)}")
    assert not failures, "\n".join(failures)


async def test_conditions_combine_with_and(retrieval: Retrieval) -> None:
    await upsert(retrieval, *(doc(i, X, "", **m) for i, m in FILTER_DOCS.items()))
    both = where(cond("lang", "EQ", "en"), cond("year", "GTE", 2021))
    assert ids(await search(retrieval, vector=X, filter=both)) == ["f2"]


# -- collections ------------------------------------------------------------------------------


async def test_collections_are_separate_and_droppable(retrieval: Retrieval) -> None:
    await seed_near(retrieval)  # "default", 3 dimensions
    await upsert(retrieval, doc("x", [1.0, 0.0]), doc("y", [0.0, 1.0]), collection="two")
    assert await counts(retrieval) == {"default": (3, 5), "two": (2, 2)}
    assert ids(await search(retrieval, collection="two", vector=[1.0, 0.1])) == ["x", "y"]
    assert ids(await search(retrieval, collection="default", vector=X, top_k=1)) == ["a"]
    await retrieval.client.delete_collection("two")
    assert await counts(retrieval) == {"default": (3, 5)}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await search(retrieval, collection="two", vector=[1.0, 0.0])
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    # a dropped name can be created again, with another dimension
    await upsert(retrieval, doc("z", [1.0, 0.0, 0.0, 0.0]), collection="two")
    assert (await counts(retrieval))["two"] == (4, 1)


async def test_health_and_models(retrieval: Retrieval) -> None:
    stub = health_pb2_grpc.HealthStub(retrieval.channel)
    for name in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    models = await ModelClient(retrieval.channel).list_models()
    assert list(models.models) == []  # retrieval serves no model


# -- bad input --------------------------------------------------------------------------------

S = retrieval_pb2.SearchRequest
U = retrieval_pb2.UpsertRequest
D = retrieval_pb2.DeleteRequest
BAD: list[tuple[str, object, grpc.StatusCode, str]] = [
    ("search top_k < 0", S(vector=X, top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k is -1"),
    ("search top_k > max", S(vector=X, top_k=1001), grpc.StatusCode.INVALID_ARGUMENT, "1..1000"),
    ("search nothing", S(top_k=1), grpc.StatusCode.INVALID_ARGUMENT, "give vector"),
    ("search blank query", S(query="  "), grpc.StatusCode.INVALID_ARGUMENT, "give vector"),
    ("search dims", S(vector=[1.0, 0.0]), grpc.StatusCode.INVALID_ARGUMENT, "2 dimensions"),
    ("search nan", S(vector=[math.nan, 1, 0]), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("search zero", S(vector=[0, 0, 0]), grpc.StatusCode.INVALID_ARGUMENT, "all zeros"),
    (
        "search unknown collection",
        S(collection="nope", vector=X),
        grpc.StatusCode.NOT_FOUND,
        "collection 'nope' does not exist; existing collections: 'default'",
    ),
    (
        "search threshold nan",
        S(vector=X, score_threshold=math.nan),
        grpc.StatusCode.INVALID_ARGUMENT,
        "score_threshold",
    ),
    (
        "filter operator unset",
        S(vector=X, filter=where(cond("k", 0, "a"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "OPERATOR_UNSPECIFIED",
    ),
    (
        "filter IN scalar",
        S(vector=X, filter=where(cond("k", "IN", "a"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expects a list",
    ),
    (
        "filter GT bool",
        S(vector=X, filter=where(cond("k", "GT", True))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expects a number or a string",
    ),
    (
        "filter EQ list",
        S(vector=X, filter=where(cond("k", "EQ", [1]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "got a list",
    ),
    (
        "filter IN of objects",
        S(vector=X, filter=where(cond("k", "IN", [{"a": 1}]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "value[0]",
    ),
    (
        "filter value unset",
        S(vector=X, filter=where(cond("k", "EQ"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "value is not set",
    ),
    (
        "filter empty key",
        S(vector=X, filter=where(cond("", "EQ", 1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "conditions[0].key",
    ),
    (
        "filter key a..b",
        S(vector=X, filter=where(cond("a..b", "EQ", 1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no empty parts",
    ),
    ("upsert nothing", U(), grpc.StatusCode.INVALID_ARGUMENT, "documents is empty"),
    (
        "upsert no id",
        U(documents=[doc("", X)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "documents[0].id is empty",
    ),
    (
        "upsert no embedding",
        U(documents=[doc("a", X), doc("b", [])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "documents[1].embedding is empty",
    ),
    (
        "upsert mixed dims",
        U(documents=[doc("a", X), doc("b", [1.0, 0.0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "documents[1].embedding has 2 dimensions but documents[0].embedding has 3",
    ),
    (
        "upsert collection dims",
        U(documents=[doc("new", [1.0, 0.0, 0.0, 0.0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "has 4 dimensions but collection 'default' holds 3-dimensional",
    ),
    (
        "upsert duplicate ids",
        U(documents=[doc("a", X), doc("b", X), doc("a", X)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "documents[2].id 'a' repeats documents[0].id",
    ),
    (
        "upsert too many",
        U(documents=[doc(f"d{i}", [1.0, 0.0, 0.0]) for i in range(1025)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "1025 documents in one request; the limit is 1024",
    ),
    (
        "upsert nan",
        U(documents=[doc("a", [1.0, math.inf, 0.0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "documents[0].embedding contains NaN or infinity",
    ),
    (
        "upsert zero",
        U(documents=[doc("a", [0.0, 0.0, 0.0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "documents[0].embedding is all zeros",
    ),
    ("delete nothing", D(), grpc.StatusCode.INVALID_ARGUMENT, "give ids and/or a filter"),
    ("delete empty id", D(ids=["a", ""]), grpc.StatusCode.INVALID_ARGUMENT, "ids[1] is empty"),
    (
        "delete unknown collection",
        D(collection="nope", ids=["a"]),
        grpc.StatusCode.NOT_FOUND,
        "collection 'nope' does not exist",
    ),
    (
        "delete bad filter",
        D(filter=where(cond("k", "NOT_IN", 3))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expects a list",
    ),
    (
        "collection name too long",
        S(collection="c" * 300, vector=X),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the limit is 256",
    ),
]


@pytest.mark.parametrize(("case", "request_", "code", "says"), BAD, ids=[b[0] for b in BAD])
async def test_bad_input(
    retrieval: Retrieval, case: str, request_: object, code: grpc.StatusCode, says: str
) -> None:
    await seed_near(retrieval)
    client = retrieval.client
    method = {S: client.search, U: client.upsert, D: client.delete}[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(request_)  # type: ignore[operator]
    assert info.value.code() is code
    assert says in (info.value.details() or "")
    assert await counts(retrieval) == {"default": (3, 5)}  # nothing was written


async def test_bad_collection_calls(retrieval: Retrieval) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await search(retrieval, vector=X)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert "no collections yet" in (info.value.details() or "")
    for name in ("one", "two", "three", "four", "five", "six"):
        await upsert(retrieval, doc("a", X), collection=name)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await retrieval.client.delete_collection("seven")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    details = info.value.details() or ""
    assert "'five', 'four', 'one', 'six', 'three' and 1 more" in details
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await retrieval.client.delete_collection("")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "name is empty" in (info.value.details() or "")


async def test_limits_come_from_settings(backend_settings: Settings) -> None:
    settings = dataclasses.replace(backend_settings, default_top_k=2, max_top_k=3, max_batch=4)
    service = build(ServerConfig(host="127.0.0.1", port=0), settings)
    await service.start()
    channel = connect(service.target, [SERVICE], NO_RETRY)
    try:
        client = RetrievalClient(channel)
        r = Retrieval(service, client, channel, settings)
        for c in (await client.list_collections()).collections:
            await client.delete_collection(c.name)
        await upsert(r, *(doc(k, v) for k, (v, _) in list(NEAR.items())[:4]))
        assert ids(await search(r, vector=X)) == ["a", "b"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await search(r, vector=X, top_k=4)
        assert "give 1..3 (OPEA_RETRIEVAL_MAX_TOP_K)" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upsert(r, *(doc(f"n{i}", X) for i in range(5)))
        assert "the limit is 4 (OPEA_RETRIEVAL_MAX_BATCH)" in (info.value.details() or "")
    finally:
        await channel.close(None)
        await service.stop(0)
