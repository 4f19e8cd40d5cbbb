"""The ``local`` retrieval backend beyond the contract: the switch to HNSW past
``ann_threshold`` (still exact for clear cases, never a deleted id, filters honoured), the graph
surviving a restart, compaction, the data-directory lock, reciprocal rank fusion, and the
vectorised filter agreeing with the reference semantics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from opea_grpc.config import ConfigError
from opea_grpc.errors import ServiceError
from services.retrieval.backend import (
    JSON,
    Condition,
    Op,
    Record,
    Scalar,
    check_conditions,
    make_backend,
    matches,
)
from services.retrieval.columns import Columns, evaluate
from services.retrieval.fusion import rrf
from services.retrieval.local import LocalBackend
from services.retrieval.service import Settings
from services.retrieval.store import fts_query

DIM = 16
N = 1500


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """``n`` vectors around 30 centres: neighbours are clear, as with real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, DIM))
    points = centres[rng.integers(0, 30, n)] + 0.3 * rng.standard_normal((n, DIM))
    return points.astype(np.float32)


def records(vectors: np.ndarray, start: int = 0) -> list[Record]:
    return [
        Record(f"v{start + i}", f"text {start + i}", {"i": start + i, "odd": (start + i) % 2}, v)
        for i, v in enumerate(vectors)
    ]


def exact_top(vectors: np.ndarray, alive: list[int], query: np.ndarray, k: int) -> list[str]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit[alive] @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:k]
    return [f"v{alive[i]}" for i in order]


def local_settings(tmp_path: Path, **fields: object) -> Settings:
    return dataclasses.replace(
        Settings(data_dir=str(tmp_path / "index")),
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
async def ann_backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    backend = LocalBackend(local_settings(tmp_path, ann_threshold=200))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def test_switches_to_hnsw_and_stays_right(ann_backend: LocalBackend) -> None:
    backend = ann_backend
    vectors = clustered(N)
    await backend.upsert("c", records(vectors[:100]))
    await backend.settle()
    assert not backend.uses_ann("c")  # below the threshold: exact
    for start in range(100, N, 500):
        await backend.upsert("c", records(vectors[start : start + 500], start))
    await backend.settle()
    assert backend.uses_ann("c")

    # clear cases: a document's own vector, slightly moved, finds that document first
    rng = np.random.default_rng(1)
    for i in rng.choice(N, 40, replace=False).tolist():
        query = vectors[i] + 0.01 * rng.standard_normal(DIM).astype(np.float32)
        hits = await backend.search("c", query, "", 5, [], None)
        assert f"v{i}" in [h.id for h in hits]  # approximate: present, not necessarily first
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    # deleted and replaced documents never come back
    doomed = rng.choice(N, 200, replace=False).tolist()
    assert await backend.delete("c", [f"v{i}" for i in doomed[:100]], []) == 100
    assert await backend.delete("c", [], [Condition("i", Op.IN, tuple(doomed[100:]))]) == 100
    moved = [i for i in range(N) if i not in set(doomed)][:50]
    far = -vectors[moved]  # each moved document now points the other way
    replaced = [
        Record(f"v{i}", "moved", {"i": i, "odd": i % 2}, v) for i, v in zip(moved, far, strict=True)
    ]
    await backend.upsert("c", replaced)
    gone = {f"v{i}" for i in doomed}
    for i in doomed[:60] + moved:
        hits = await backend.search("c", vectors[i], "", 10, [], None)
        assert not gone & {h.id for h in hits}
        assert f"v{i}" not in {h.id for h in hits if h.text != "moved"}
    info = {c.name: c.count for c in await backend.collections()}
    assert info == {"c": N - 200}


async def test_filtered_ann_search_matches_exact(ann_backend: LocalBackend) -> None:
    backend = ann_backend
    vectors = clustered(N, seed=2)
    for start in range(0, N, 500):
        await backend.upsert("c", records(vectors[start : start + 500], start))
    await backend.settle()
    assert backend.uses_ann("c")
    odd = [i for i in range(N) if i % 2]
    rare = [i for i in range(N) if i % 50 == 0]  # few survivors: exact over the subset
    rng = np.random.default_rng(3)
    for i in rng.choice(N, 20, replace=False).tolist():
        hits = await backend.search("c", vectors[i], "", 10, [Condition("odd", Op.EQ, 1)], None)
        assert all(h.metadata["odd"] == 1 for h in hits)
        assert len(hits) == 10
        want = exact_top(vectors, odd, vectors[i], 10)
        assert want[0] in [h.id for h in hits]
        assert len({h.id for h in hits} & set(want)) >= 8  # approximate, but close
        few = [Condition("i", Op.IN, tuple(rare))]
        hits = await backend.search("c", vectors[i], "", 10, few, None)
        assert [h.id for h in hits] == exact_top(vectors, rare, vectors[i], 10)


async def test_graph_survives_restart_and_catches_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = local_settings(tmp_path, ann_threshold=200)
    vectors = clustered(N, seed=4)
    backend = LocalBackend(settings)
    await backend.start()
    await backend.upsert("c", records(vectors[:1000]))
    await backend.settle()
    assert backend.uses_ann("c")
    await backend.close()
    assert (Path(settings.data_dir) / "ann" / "1.usearch").exists()

    # Writes made while the graph on disk is not updated: the next start must catch up.
    backend = LocalBackend(dataclasses.replace(settings, ann_threshold=10**9))
    await backend.start()
    await backend.upsert("c", records(vectors[1000:], 1000))
    await backend.delete("c", ["v0", "v1"], [])
    await backend.close()

    backend = LocalBackend(settings)
    with caplog.at_level(logging.INFO, logger="services.retrieval"):
        await backend.start()
        await backend.settle()
    try:
        assert "graph restored, 0 removed and 0 added" not in caplog.text
        assert "graph restored, 2 removed and 500 added to catch up" in caplog.text
        assert backend.uses_ann("c")
        for i in (5, 1200, 1499):  # one from before the restart, two caught up
            assert (await backend.search("c", vectors[i], "", 1, [], None))[0].id == f"v{i}"
        for i in (0, 1):  # deleted while the graph on disk still held them
            hits = await backend.search("c", vectors[i], "", 10, [], None)
            assert {"v0", "v1"}.isdisjoint(h.id for h in hits)
    finally:
        await backend.close()


async def test_damaged_graph_is_rebuilt(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, ann_threshold=100)
    backend = LocalBackend(settings)
    await backend.start()
    vectors = clustered(300, seed=5)
    await backend.upsert("c", records(vectors))
    await backend.settle()
    await backend.close()
    graph = Path(settings.data_dir) / "ann" / "1.usearch"
    graph.write_bytes(b"not a graph")
    backend = LocalBackend(settings)
    await backend.start()
    try:
        await backend.settle()
        assert backend.uses_ann("c")
        assert (await backend.search("c", vectors[7], "", 1, [], None))[0].id == "v7"
    finally:
        await backend.close()


async def test_compaction_keeps_results(tmp_path: Path) -> None:
    backend = LocalBackend(local_settings(tmp_path))
    await backend.start()
    try:
        vectors = clustered(3000, seed=6)
        for start in range(0, 3000, 1000):
            await backend.upsert("c", records(vectors[start : start + 1000], start))
        # deleting most rows compacts the in-memory arrays; then replace some of the rest
        assert await backend.delete("c", [], [Condition("i", Op.GTE, 400)]) == 2600
        await backend.upsert("c", records(vectors[:100] * -1))
        alive = list(range(100, 400))
        for i in (150, 399):
            hits = await backend.search("c", vectors[i], "", 5, [], None)
            assert [h.id for h in hits] == exact_top(vectors, alive, vectors[i], 5)
        hits = await backend.search("c", -vectors[5], "", 1, [], None)
        assert hits[0].id == "v5"
        assert [(c.name, c.count) for c in await backend.collections()] == [("c", 400)]
    finally:
        await backend.close()


async def test_data_dir_is_locked_while_open(tmp_path: Path) -> None:
    first = LocalBackend(local_settings(tmp_path))
    await first.start()
    try:
        second = LocalBackend(local_settings(tmp_path))
        with pytest.raises(ConfigError, match="in use by another process"):
            await second.start()
        assert not await second.ready()
        assert await first.ready()
    finally:
        await first.close()
    assert not await first.ready()
    third = LocalBackend(local_settings(tmp_path))
    await third.start()  # the lock went with the first process's close
    await third.close()


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    backend = LocalBackend(local_settings(tmp_path))
    await backend.start()
    await backend.close()
    with pytest.raises(ServiceError) as info:
        await backend.upsert("c", records(clustered(1)))
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_unknown_backend_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose one of local, pgvector"):
        Settings(backend="faiss")
    settings = local_settings(tmp_path)
    object.__setattr__(settings, "backend", "faiss")  # past validation, to reach the factory
    with pytest.raises(ConfigError, match="unknown backend 'faiss'"):
        make_backend(settings)


def test_rrf() -> None:
    fused = rrf([["a", "b", "c"], ["c", "a"]], k=60)
    assert [key for key, _ in fused] == ["a", "c", "b"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert rrf([], k=60) == []


def test_columns_agree_with_matches_at_random() -> None:
    """The vectorised filter is the reference semantics, on random metadata and conditions."""
    rng = np.random.default_rng(7)
    pool: list[JSON] = [0, 1, 1.0, 2.5, -3, True, False, "a", "b", "B", "", None, [1], {"x": 1}]
    scalars: list[Scalar] = [v for v in pool if isinstance(v, bool | int | float | str)]
    ordered: list[Scalar] = [1, 2.5, "a", "B", -3]
    keys = ["k", "m", "n.x", "n.y.z"]

    def pick() -> JSON:
        return pool[int(rng.integers(len(pool)))]

    metadata: list[dict[str, JSON]] = []
    for _ in range(400):
        meta: dict[str, JSON] = {}
        for key in ("k", "m"):
            if rng.random() < 0.8:
                meta[key] = pick()
        if rng.random() < 0.7:
            meta["n"] = {"x": pick(), "y": {"z": pick()}} if rng.random() < 0.8 else pick()
        metadata.append(meta)
    columns = Columns(metadata)
    for _ in range(300):
        conditions = []
        for _ in range(int(rng.integers(1, 3))):
            op = Op(int(rng.integers(1, 9)))
            if op in (Op.IN, Op.NOT_IN):
                size = int(rng.integers(0, 4))
                value: Scalar | tuple[Scalar, ...] = tuple(
                    scalars[int(i)] for i in rng.integers(len(scalars), size=size)
                )
            elif op in (Op.GT, Op.GTE, Op.LT, Op.LTE):
                value = ordered[int(rng.integers(len(ordered)))]
            else:
                value = scalars[int(rng.integers(len(scalars)))]
            conditions.append(Condition(keys[int(rng.integers(len(keys)))], op, value))
        check_conditions(conditions)
        fast = evaluate(columns, len(metadata), conditions)
        slow = [matches(m, conditions) for m in metadata]
        assert fast.tolist() == slow, conditions


def test_lexical_query_is_words_without_stopwords() -> None:
    assert fts_query("What is the Zeppelin's range?") == '"zeppelin" OR "s" OR "range"'
    assert fts_query("the who") == '"the" OR "who"'  # nothing but stopwords: keep them
    assert fts_query('say "hi" NEAR(x) OR y*') == '"say" OR "hi" OR "near" OR "x" OR "y"'
    assert fts_query("?!") == ""


async def test_searches_during_writes_never_see_acknowledged_deletes(tmp_path: Path) -> None:
    """Searches race upserts, deletes, compactions and a graph build; none may return a
    document whose delete was acknowledged before the search started."""
    backend = LocalBackend(local_settings(tmp_path, ann_threshold=800))
    await backend.start()
    vectors = clustered(4000, seed=8)
    deleted: set[str] = set()
    done = asyncio.Event()
    violations: list[str] = []
    searches = 0

    async def write() -> None:
        rng = np.random.default_rng(9)
        try:
            for start in range(0, 4000, 250):
                if start:  # the first batch is in before the race starts
                    await backend.upsert("c", records(vectors[start : start + 250], start))
                live = [i for i in range(start + 250) if f"v{i}" not in deleted]
                doomed = [f"v{i}" for i in rng.choice(live, 120, replace=False).tolist()]
                await backend.delete("c", doomed, [])
                deleted.update(doomed)  # acknowledged
        finally:
            done.set()

    async def search(seed: int) -> None:
        nonlocal searches
        rng = np.random.default_rng(seed)
        while not done.is_set():
            before = set(deleted)
            query = vectors[int(rng.integers(4000))]
            conditions = [Condition("odd", Op.EQ, 1)] if rng.random() < 0.3 else []
            hits = await backend.search("c", query, "text", 20, conditions, None)
            searches += 1
            violations.extend(h.id for h in hits if h.id in before)

    try:
        await backend.upsert("c", records(vectors[:250]))
        await asyncio.gather(write(), search(1), search(2))
        await backend.settle()
        assert backend.uses_ann("c")
        assert searches >= 5  # the race did happen
        assert violations == []
        count = {c.name: c.count for c in await backend.collections()}["c"]
        assert count == 4000 - len(deleted)
        for i in range(0, 4000, 97):
            hits = await backend.search("c", vectors[i], "", 50, [], None)
            assert deleted.isdisjoint(h.id for h in hits)
    finally:
        await backend.close()
