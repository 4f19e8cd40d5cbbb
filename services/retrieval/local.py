"""``local``: a durable index inside the process, under ``OPEA_RETRIEVAL_DATA_DIR``.

SQLite (:mod:`services.retrieval.store`) is the source of truth: an Upsert is acknowledged
after its transaction committed with ``synchronous=FULL``, so it survives ``kill -9``; at start
every collection is loaded back into memory (:mod:`services.retrieval.index`). Dense search is
exact (numpy) until a collection reaches ``ann_threshold`` documents, then goes through a usearch
HNSW graph kept in the background by :mod:`services.retrieval.graphs` (saved under ``ann/``, so
a restart restores it and only catches up on the difference). Lexical search is FTS5 BM25,
fused with dense by reciprocal rank fusion.

Threads: every write runs on one writer thread (the only user of the write connection, so
writes are serialised); searches run in ``asyncio.to_thread`` on pooled read connections; graph
builds and saves run on one graph thread. Nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import numpy as np

from opea_grpc.config import ConfigError
from opea_grpc.errors import ServiceError
from services.retrieval import fusion
from services.retrieval.backend import (
    JSON,
    CollectionInfo,
    Condition,
    Hit,
    Record,
    Vector,
    unknown_collection,
    wrong_dimension,
)
from services.retrieval.graphs import Graphs
from services.retrieval.index import AnnParams, CollectionIndex, normalise
from services.retrieval.store import Store

if TYPE_CHECKING:
    from services.retrieval.service import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Collection:
    cid: int
    name: str
    index: CollectionIndex


class LocalBackend:
    """The embedded on-disk backend. The constructor does no I/O."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._dir = Path(settings.data_dir)
        self._store = Store(self._dir)
        self._params = AnnParams(
            threshold=settings.ann_threshold,
            connectivity=settings.ann_connectivity,
            expansion_add=settings.ann_expansion_add,
            expansion_search=settings.ann_expansion_search,
        )
        self._graphs = Graphs(self._dir / "ann", settings.ann_threshold)
        self._collections: dict[str, _Collection] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self._open = False
        self._failure: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._writer is not None:
            raise RuntimeError("the local retrieval backend is already started")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="retrieval-writer")
        try:
            await self._write(self._open_sync)
        except BaseException:
            await self.close()
            raise
        self._open = True

    def _open_sync(self) -> None:
        self._lock_dir()
        self._store.open()
        for stored in self._store.collections():
            loaded = self._store.load(stored.cid, stored.dimensions)
            index = CollectionIndex(stored.dimensions, self._params)
            index.add(loaded.seqs.tolist(), loaded.vectors, loaded.metadata)
            self._collections[stored.name] = _Collection(stored.cid, stored.name, index)
        self._graphs.open(c.cid for c in self._collections.values())
        for entry in self._collections.values():
            self._maintain(entry)
        log.info(
            "retrieval index %s: %s",
            self._dir,
            ", ".join(f"{c.name} ({c.index.count})" for c in self._collections.values())
            or "no collections",
        )

    def _lock_dir(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"OPEA_RETRIEVAL_DATA_DIR {self._dir} is in use by another process: "
                "stop it, or give this one another directory"
            ) from None
        self._lock_fd = fd

    async def close(self) -> None:
        """Stop background builds, save the graphs, close the database."""
        self._open = False
        await self._graphs.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            await asyncio.get_running_loop().run_in_executor(writer, self._close_sync)
            await asyncio.to_thread(writer.shutdown, wait=True)

    def _close_sync(self) -> None:
        self._graphs.save_all((c.cid, c.index) for c in self._collections.values())
        self._collections.clear()
        self._store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def ready(self) -> bool:
        return self._open and self._failure is None

    async def settle(self) -> None:
        """Wait until no graph build or save is queued or running (tests, benchmarks)."""
        await self._graphs.settle()

    def uses_ann(self, collection: str) -> bool:
        """Whether searches of ``collection`` go through its HNSW graph now."""
        entry = self._collections.get(collection)
        return entry is not None and entry.index.uses_ann

    # -- the Backend protocol -----------------------------------------------------------------

    async def search(
        self,
        collection: str,
        vector: Vector | None,
        query: str,
        top_k: int,
        conditions: Sequence[Condition],
        score_threshold: float | None,
    ) -> list[Hit]:
        entry = self._get(collection)
        if vector is not None and vector.shape[0] != entry.index.dimensions:
            raise wrong_dimension(
                collection, entry.index.dimensions, vector.shape[0], "the query vector"
            )
        try:
            return await asyncio.to_thread(
                self._search_sync, entry, vector, query, top_k, conditions, score_threshold
            )
        except sqlite3.OperationalError:
            if self._collections.get(collection) is not entry:  # dropped during the search
                raise unknown_collection(collection, list(self._collections)) from None
            raise

    def _search_sync(
        self,
        entry: _Collection,
        vector: Vector | None,
        query: str,
        top_k: int,
        conditions: Sequence[Condition],
        score_threshold: float | None,
    ) -> list[Hit]:
        index = entry.index
        view = index.view()
        allowed = view.allowed(conditions)
        hybrid = vector is not None and bool(query)
        want = max(4 * top_k, self._settings.hybrid_candidates) if hybrid else top_k
        dense: list[tuple[int, float]] = []
        lexical: list[tuple[int, float]] = []
        if vector is not None:
            dense = index.nearest(view, normalise(vector), want, allowed)
        if query:
            limit = None if conditions else want
            found = self._store.lexical(entry.cid, query, limit)
            lexical = [(s, b) for s, b in found if view.row_of(s, allowed) is not None][:want]
        if hybrid:
            settings = self._settings
            ranked = fusion.hybrid(
                dense,
                lexical,
                method=settings.fusion,
                rrf_k=settings.rrf_k,
                dense_weight=settings.dense_weight,
                lexical_complete=len(lexical) < want,
            )
        else:
            ranked = dense or lexical
        if score_threshold is not None:
            ranked = [(s, score) for s, score in ranked if score >= score_threshold]
        return self._hits(entry, ranked, top_k)

    def _hits(self, entry: _Collection, ranked: list[tuple[int, float]], top_k: int) -> list[Hit]:
        if len(ranked) > top_k:  # keep the ties at the cut, so the id order can settle them
            cut = ranked[top_k - 1][1]
            ranked = [
                (s, score) for i, (s, score) in enumerate(ranked) if i < top_k or score >= cut
            ]
        rows = self._store.fetch(entry.cid, [s for s, _ in ranked])
        hits = [
            Hit(row.id, row.text, row.metadata, score)
            for s, score in ranked
            if (row := rows.get(s)) is not None
        ]
        hits.sort(key=lambda h: (-h.score, h.id))
        return hits[:top_k]

    async def upsert(self, collection: str, records: Sequence[Record]) -> int:
        return await self._write(self._upsert_sync, collection, records)

    def _upsert_sync(self, collection: str, records: Sequence[Record]) -> int:
        entry = self._collections.get(collection)
        dimensions = entry.index.dimensions if entry else records[0].vector.shape[0]
        for i, record in enumerate(records):
            if record.vector.shape[0] != dimensions:
                raise wrong_dimension(
                    collection, dimensions, record.vector.shape[0], f"documents[{i}].embedding"
                )
        vectors = normalise(np.stack([r.vector for r in records]))
        metadata: list[dict[str, JSON]] = [json.loads(json.dumps(r.metadata)) for r in records]
        cid, removed, added = self._store.upsert(
            entry.cid if entry else None, collection, records, vectors
        )
        with self._in_step():
            if entry is None:
                entry = _Collection(cid, collection, CollectionIndex(dimensions, self._params))
                self._collections[collection] = entry
            entry.index.remove(removed)
            entry.index.add(added, vectors, metadata)
            self._maintain(entry)
        return len(records)

    async def delete(
        self, collection: str, ids: Sequence[str], conditions: Sequence[Condition]
    ) -> int:
        return await self._write(self._delete_sync, collection, ids, conditions)

    def _delete_sync(
        self, collection: str, ids: Sequence[str], conditions: Sequence[Condition]
    ) -> int:
        entry = self._get(collection)
        seqs: list[int] = []
        if conditions:
            view = entry.index.view()
            seqs = view.seqs[: view.n][view.allowed(conditions)].tolist()
        doomed = self._store.delete(entry.cid, ids, seqs)
        with self._in_step():
            entry.index.remove(doomed)
            self._maintain(entry)
        return len(doomed)

    async def collections(self) -> list[CollectionInfo]:
        return [
            CollectionInfo(c.name, c.index.dimensions, c.index.count)
            for c in sorted(self._collections.values(), key=lambda c: c.name)
        ]

    async def drop(self, collection: str) -> bool:
        return await self._write(self._drop_sync, collection)

    def _drop_sync(self, collection: str) -> bool:
        entry = self._collections.get(collection)
        if entry is None:
            return False
        self._store.drop(entry.cid)
        del self._collections[collection]
        self._graphs.forget(entry.cid)
        return True

    # -- helpers ------------------------------------------------------------------------------

    def _get(self, collection: str) -> _Collection:
        entry = self._collections.get(collection)
        if entry is None:
            raise unknown_collection(collection, list(self._collections))
        return entry

    async def _write(self, fn: Callable[..., T], *args: object) -> T:
        if self._writer is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the retrieval index is not open")
        if self._failure is not None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"the retrieval index failed ({self._failure}): restart the service",
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._writer, functools.partial(fn, *args))
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the disk under {self._dir} is full: free space, then retry",
                ) from exc
            raise

    @contextlib.contextmanager
    def _in_step(self) -> Iterator[None]:
        """Memory follows a committed write; if that fails, stop serving rather than lie."""
        try:
            yield
        except BaseException as exc:
            self._failure = f"{type(exc).__name__} while updating memory after a commit"
            log.exception("retrieval index out of step with %s: restart to reload", self._dir)
            raise

    def _maintain(self, entry: _Collection) -> None:
        def current() -> bool:
            return self._collections.get(entry.name) is entry

        self._graphs.maintain(entry.cid, entry.index, current)
