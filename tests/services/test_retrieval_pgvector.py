"""The ``pgvector`` retrieval backend: the whole contract suite of ``test_retrieval.py`` over
PostgreSQL, then what is pgvector's own.

The contract tests are imported and collected here again with ``backend_settings`` overridden to
the ``pgvector`` backend on the session's database (the ``postgres`` fixture of
``tests/services/conftest.py``). Own tests: the schema (HNSW and GIN indexes, usable by the
queries), filters translated to SQL agree with :func:`services.retrieval.filters.matches` on
random data, hostile keys and values stay data, HNSW recall and the exact fallback, replicas
sharing one database, health following the database, and the process run from the environment.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opea_grpc.channel import connect
from opea_grpc.client import RetrievalClient
from opea_grpc.config import ConfigError, ServerConfig
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import retrieval_pb2
from services.retrieval.backend import JSON, Condition, Op, Record, make_backend, matches
from services.retrieval.pgvector import PgvectorBackend, where_sql
from services.retrieval.service import Settings, build
from tests.processes import health, served
from tests.services.pg import PostgresServer
from tests.services.test_retrieval import *  # noqa: F403  (the contract tests, collected here)
from tests.services.test_retrieval import (
    NO_RETRY,
    SERVICE,
    Retrieval,
    X,
    cond,
    counts,
    doc,
    ids,
    search,
    to_dict,
    upsert,
    where,
)

# A pure check of the reference, not of a backend: test_retrieval.py runs it already.
del test_reference_filter_semantics  # noqa: F821

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(params=["pgvector"])  # type: ignore[no-redef]  # overrides the imported one
def backend_settings(request: pytest.FixtureRequest, postgres: PostgresServer) -> Settings:
    """Overrides the contract suite's fixture: every imported test runs on pgvector."""
    return Settings(backend="pgvector", dsn=postgres.dsn)


@pytest.fixture
async def backend(postgres: PostgresServer) -> AsyncIterator[PgvectorBackend]:
    """A started backend over the shared database, emptied first."""
    b = PgvectorBackend(Settings(backend="pgvector", dsn=postgres.dsn))
    await b.start()
    for c in await b.collections():
        await b.drop(c.name)
    try:
        yield b
    finally:
        await b.close()


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def table_of(dsn: str, collection: str) -> str:
    rows = await fetch(dsn, "SELECT id FROM opea_collections WHERE name = $1", collection)
    return f"opea_docs_{rows[0]['id']}"


async def wait_for_status(channel: grpc.aio.Channel, status: int, timeout: float = 30) -> None:
    """Return once the retrieval service's health reads ``status`` (Watch, no polling)."""
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
    try:
        async for reply in call:
            if reply.status == status:
                return
    finally:
        call.cancel()
    raise AssertionError(f"health stream ended before {status}")


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` vectors around 20 centres: neighbours are clear, as with real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    points = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim))
    return points.astype(np.float32)


# -- schema -----------------------------------------------------------------------------------


async def test_collection_table_has_hnsw_and_gin_indexes_the_queries_use(
    retrieval: Retrieval, postgres: PostgresServer
) -> None:
    await upsert(retrieval, doc("a", X, "zeppelin"), doc("b", [0.0, 1.0, 0.0]), collection="ix")
    table = await table_of(postgres.dsn, "ix")
    defs = [
        r["indexdef"]
        for r in await fetch(
            postgres.dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = $1", table
        )
    ]
    assert any("USING hnsw (embedding vector_cosine_ops)" in d for d in defs), defs
    assert any("USING gin (tsv)" in d for d in defs), defs
    # The operator and the opclass match: the planner can serve the ORDER BY from the index.
    conn = await asyncpg.connect(postgres.dsn)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            plan = await conn.fetch(
                f"EXPLAIN SELECT id FROM {table} ORDER BY embedding <=> '[1,0,0]' LIMIT 1"
            )
            assert f"Index Scan using {table}_embedding" in plan[1][0]
            plan = await conn.fetch(
                f"EXPLAIN SELECT id FROM {table} WHERE tsv @@ 'zeppelin'::tsquery"
            )
            assert any(f"{table}_tsv" in r[0] for r in plan), plan
    finally:
        await conn.close()
    await retrieval.client.delete_collection("ix")
    assert await fetch(postgres.dsn, "SELECT 1 FROM pg_tables WHERE tablename = $1", table) == []


# -- filters ----------------------------------------------------------------------------------

KEYS = ["a", "b", "a.b", "a.b.c", "n"]
SCALARS: list[JSON] = [0, 1, 1.5, -2, 10, "x", "X", "é", "", "10", "9", True, False]


def random_value(rng: random.Random, depth: int = 0) -> JSON:
    kind = rng.random()
    if depth < 2 and kind < 0.25:
        return {k: random_value(rng, depth + 1) for k in rng.sample(["b", "c", "x"], 2)}
    if kind < 0.35:
        return [rng.choice(SCALARS) for _ in range(2)]
    if kind < 0.4:
        return None
    return rng.choice(SCALARS)


def random_condition(rng: random.Random) -> Condition:
    op = rng.choice(list(Op))
    if op in (Op.IN, Op.NOT_IN):
        value: object = tuple(rng.sample(SCALARS, rng.randint(0, 3)))
    elif op in (Op.GT, Op.GTE, Op.LT, Op.LTE):
        value = rng.choice([s for s in SCALARS if not isinstance(s, bool)])
    else:
        value = rng.choice(SCALARS)
    return Condition(rng.choice(KEYS), op, value)  # type: ignore[arg-type]


async def test_sql_filters_agree_with_the_reference_on_random_data(
    backend: PgvectorBackend,
) -> None:
    rng = random.Random(7)
    metadata: dict[str, dict[str, JSON]] = {
        f"m{i}": {k: random_value(rng) for k in rng.sample(["a", "b", "n"], rng.randint(0, 3))}
        for i in range(60)
    }
    vector = np.ones(4, dtype=np.float32)
    await backend.upsert("f", [Record(i, "t", m, vector) for i, m in metadata.items()])
    failures = []
    for _ in range(150):
        conditions = [random_condition(rng) for _ in range(rng.choice([1, 1, 2]))]
        hits = await backend.search("f", vector, "", 100, conditions, None)
        want = {i for i, m in metadata.items() if matches(m, conditions)}
        if {h.id for h in hits} != want:
            failures.append(f"{conditions}: got {sorted(h.id for h in hits)}, want {sorted(want)}")
    assert not failures, "\n".join(failures[:5])


def test_filter_sql_carries_no_value() -> None:
    evil = "x'); DROP TABLE opea_collections; --"
    params: list[object] = []
    sql = where_sql(
        [Condition(f"{evil}.{evil}", Op.EQ, evil), Condition(evil, Op.IN, (evil, 1))], params
    )
    assert "DROP" not in sql
    assert "'x'" not in sql
    assert params == [evil, evil, evil, evil, [evil, 1]]


async def test_hostile_keys_values_and_names_stay_data(
    retrieval: Retrieval, postgres: PostgresServer
) -> None:
    evil = "x'); DROP TABLE opea_collections; SELECT pg_sleep(30); --"
    quoted = "a\"b'c"
    collection = "c'; DROP TABLE opea_collections; --"
    metadata: dict[str, JSON] = {evil: evil, quoted: {quoted: 1}}
    await upsert(
        retrieval,
        doc(evil, X, evil, **metadata),
        doc("plain", X, "plain", k="v"),
        collection=collection,
    )
    found = await search(
        retrieval, collection=collection, vector=X, filter=where(cond(evil, "EQ", evil))
    )
    assert ids(found) == [evil]
    assert to_dict(found[0].document.metadata)[evil] == evil
    found = await search(
        retrieval,
        collection=collection,
        vector=X,
        filter=where(cond(f"{quoted}.{quoted}", "IN", [1, evil])),
    )
    assert ids(found) == [evil]
    found = await search(retrieval, collection=collection, query=evil, vector=X)
    assert ids(found)[0] == evil
    reply = await retrieval.client.delete(
        retrieval_pb2.DeleteRequest(collection=collection, filter=where(cond(evil, "NE", evil)))
    )
    assert reply.deleted_count == 1
    assert await counts(retrieval) == {collection: (3, 1)}
    tables = await fetch(postgres.dsn, "SELECT tablename FROM pg_tables WHERE tablename ~ 'opea'")
    assert {r["tablename"] for r in tables} == {
        "opea_collections",
        await table_of(postgres.dsn, collection),
    }


async def test_nul_characters_are_refused_with_a_reason(retrieval: Retrieval) -> None:
    await upsert(retrieval, doc("a", X))
    for bad in (doc("b", X, "te\x00xt"), doc("b\x00", X), doc("b", X, "t", k="v\x00")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upsert(retrieval, bad)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "NUL" in (info.value.details() or "")
    assert await counts(retrieval) == {"default": (3, 1)}


# -- search beyond the contract ---------------------------------------------------------------


async def test_hnsw_recall_exact_fallback_and_ties(backend: PgvectorBackend) -> None:
    dim, n = 16, 1500
    vectors = unit_rows(n, dim, seed=1)
    records = [Record(f"v{i}", f"t{i}", {"i": i, "odd": i % 2}, v) for i, v in enumerate(vectors)]
    for start in range(0, n, 500):
        await backend.upsert("ann", records[start : start + 500])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def exact(query: np.ndarray, allowed: np.ndarray, k: int) -> list[str]:
        scores = np.where(allowed, unit @ (query / np.linalg.norm(query)), -np.inf)
        return [f"v{i}" for i in np.argsort(-scores, kind="stable")[:k]]

    everyone = np.ones(n, dtype=bool)
    odd = np.arange(n) % 2 == 1
    found_all = found_odd = 0
    for q in range(20):
        query = vectors[q * 37] + 0.05
        hits = await backend.search("ann", query, "", 10, [], None)
        found_all += len({h.id for h in hits} & set(exact(query, everyone, 10)))
        hits = await backend.search("ann", query, "", 10, [Condition("odd", Op.EQ, 1)], None)
        assert len(hits) == 10
        assert all(h.metadata["odd"] == 1 for h in hits)
        found_odd += len({h.id for h in hits} & set(exact(query, odd, 10)))
    assert found_all >= 0.9 * 200
    assert found_odd >= 0.9 * 200
    # A filter that leaves 7 documents: every one of them, in exact order.
    few = np.arange(n) < 7
    hits = await backend.search("ann", vectors[3], "", 10, [Condition("i", Op.LT, 7)], None)
    assert [h.id for h in hits] == exact(vectors[3], few, 7)
    # Identical vectors tie: the id settles the order, also at the cut.
    twins = [Record(f"tie{c}", "t", {}, vectors[0]) for c in "dbeac"]
    await backend.upsert("ann", twins)
    hits = await backend.search("ann", vectors[0], "", 3, [], None)  # v0 ties with them too
    assert [h.id for h in hits] == ["tiea", "tieb", "tiec"]
    hits = await backend.search("ann", vectors[0], "", 6, [], None)
    assert [h.id for h in hits] == ["tiea", "tieb", "tiec", "tied", "tiee", "v0"]


# -- replicas, health, process ----------------------------------------------------------------


async def test_replicas_share_collections_and_see_drops(postgres: PostgresServer) -> None:
    settings = Settings(backend="pgvector", dsn=postgres.dsn)
    a, b = make_backend(settings), make_backend(settings)
    await a.start()
    await b.start()
    try:
        for c in await a.collections():
            await a.drop(c.name)
        three = [Record(f"d{i}", "t", {}, np.eye(3, dtype=np.float32)[i]) for i in range(3)]
        # Two replicas create the same collection at once: one table, every document.
        await asyncio.gather(a.upsert("r", three[:2]), b.upsert("r", three[2:]))
        assert [(c.name, c.count) for c in await b.collections()] == [("r", 3)]
        assert [h.id for h in await b.search("r", three[0].vector, "", 1, [], None)] == ["d0"]
        await a.drop("r")  # b still caches the dropped table
        with pytest.raises(ServiceError) as info:
            await b.search("r", three[0].vector, "", 1, [], None)
        assert info.value.code is grpc.StatusCode.NOT_FOUND
        four = Record("q", "t", {}, np.ones(4, dtype=np.float32))
        await a.upsert("r", [four])  # recreated with another dimension
        assert [h.id for h in await b.search("r", four.vector, "", 1, [], None)] == ["q"]
        assert await b.delete("r", ["q"], []) == 1
        with pytest.raises(ServiceError) as info:
            await b.search("r", three[0].vector, "", 1, [], None)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert await a.drop("r")
        assert not await b.drop("r")
    finally:
        await a.close()
        await b.close()


async def test_concurrent_upserts_of_the_same_ids_do_not_deadlock(
    backend: PgvectorBackend,
) -> None:
    vectors = unit_rows(300, 8, seed=2)
    batch = [Record(f"s{i:03d}", "t", {"i": i}, v) for i, v in enumerate(vectors)]
    await backend.upsert("lock", batch)
    # Same rows, opposite orders, at once: row locks taken in request order would deadlock.
    for _ in range(4):
        counts_ = await asyncio.gather(
            backend.upsert("lock", batch), backend.upsert("lock", batch[::-1])
        )
        assert list(counts_) == [300, 300]
    assert [(c.name, c.count) for c in await backend.collections()] == [("lock", 300)]


async def test_health_follows_the_database() -> None:
    async with PostgresServer() as pg:
        await asyncio.to_thread(pg.stop)  # the service starts before its database
        settings = Settings(backend="pgvector", dsn=pg.dsn)
        service = build(ServerConfig(host="127.0.0.1", port=0, health_interval=0.1), settings)
        await service.start()
        channel = connect(service.target, [SERVICE], NO_RETRY)
        client = RetrievalClient(channel)
        try:
            await wait_for_status(channel, NOT_SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.list_collections()
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "OPEA_RETRIEVAL_DSN" in (info.value.details() or "")
            await asyncio.to_thread(pg.start)
            await wait_for_status(channel, SERVING)
            r = Retrieval(service, client, channel, settings)
            await upsert(r, doc("a", X), doc("b", [0.0, 1.0, 0.0]))
            await asyncio.to_thread(pg.stop)  # the database goes away under a running service
            await wait_for_status(channel, NOT_SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await search(r, vector=X)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "unreachable" in (info.value.details() or "")
            await asyncio.to_thread(pg.start)
            await wait_for_status(channel, SERVING)
            assert ids(await search(r, vector=X)) == ["a", "b"]  # committed data, new connections
        finally:
            await channel.close(None)
            await service.stop(0)


@pytest.mark.parametrize(
    ("user_db", "says"),
    [
        ("postgres@127.0.0.1:{port}/no_such_db", "no_such_db"),
        ("nobody@127.0.0.1:{port}/", "nobody"),
    ],
)
async def test_wrong_database_or_user_fails_start(
    postgres: PostgresServer, user_db: str, says: str
) -> None:
    dsn = "postgresql://" + user_db.format(port=postgres.port)
    backend = PgvectorBackend(Settings(backend="pgvector", dsn=dsn))
    with pytest.raises(ConfigError, match="OPEA_RETRIEVAL_DSN") as info:
        await backend.start()
    assert says in str(info.value)
    assert not await backend.ready()


def test_settings_require_a_dsn() -> None:
    with pytest.raises(ConfigError, match="OPEA_RETRIEVAL_DSN must be set"):
        Settings(backend="pgvector")
    backend = make_backend(Settings(backend="pgvector", dsn="postgresql://nowhere.invalid/db"))
    assert isinstance(backend, PgvectorBackend)  # the constructor did no I/O


async def test_python_m_services_retrieval_on_pgvector(
    postgres: PostgresServer, subprocess_env: dict[str, str]
) -> None:
    env = {**subprocess_env, "OPEA_RETRIEVAL_DSN": postgres.dsn, "OPEA_RETRIEVAL_POOL_SIZE": "2"}
    argv = ["-m", "services.retrieval", "--port", "0", "--host", "127.0.0.1"]
    async with served(env, *argv, "--backend", "pgvector") as child:
        assert "retrieval listening on 127.0.0.1:" in child.line
        probe = await health(subprocess_env, child.target, SERVICE)
        assert probe.code == 0, probe
        channel = connect(child.target, [SERVICE], NO_RETRY)
        try:
            r = Retrieval(None, RetrievalClient(channel), channel, Settings())  # type: ignore[arg-type]
            await upsert(r, doc("p", X, "from a process"), collection="proc")
            assert ids(await search(r, collection="proc", query="process")) == ["p"]
            await r.client.delete_collection("proc")
        finally:
            await channel.close(None)
        assert await child.stop() == 0
