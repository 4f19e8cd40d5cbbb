"""The background life of HNSW graphs: build, restore from disk and catch up, save.

One builder thread does all of it, so graph work never delays a write or a search for long
(a search keeps using exact search until a graph is installed). A graph is saved as
``<cid>.usearch`` under the data directory's ``ann/`` after it is built, every
``max(1000, size / 10)`` changes, and at close; a restart restores the file and brings it up to
date with the database by set difference of ``seq`` keys (never reused, so exact), or rebuilds
it when the file is damaged or more than half of it is missing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from usearch.index import Index

from services.retrieval.index import CollectionIndex

log = logging.getLogger(__name__)

#: A restored graph missing more than this share of the live documents is rebuilt instead.
_CATCH_UP_LIMIT = 0.5
#: Save a graph after this many changes (or a tenth of its size, if more).
_SAVE_EVERY = 1000

#: Whether a collection is still the one the job was for (False once dropped).
Current = Callable[[], bool]


class Graphs:
    """Keeps the graphs of every collection under ``directory``. The constructor does no I/O."""

    def __init__(self, directory: Path, threshold: int) -> None:
        self.directory = directory
        self.threshold = threshold
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def open(self, keep: Iterable[int]) -> None:
        """Create the directory; delete graphs of collections not in ``keep`` (and temp files)."""
        self.directory.mkdir(exist_ok=True)
        known = {self.path(cid) for cid in keep}
        for path in self.directory.iterdir():
            if path not in known:
                path.unlink()  # a dropped collection's graph, or a save cut short
        self._stop.clear()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="retrieval-graph")

    async def close(self) -> None:
        """Stop a build in progress (between chunks), drop queued jobs, wait for the thread."""
        self._stop.set()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    def save_all(self, indexes: Iterable[tuple[int, CollectionIndex]]) -> None:
        """Save every graph changed since its last save (at close, once writes have stopped)."""
        for cid, index in indexes:
            if index.has_ann and index.ann_changes:
                index.save(self.path(cid))

    def path(self, cid: int) -> Path:
        return self.directory / f"{cid}.usearch"

    def forget(self, cid: int) -> None:
        self.path(cid).unlink(missing_ok=True)

    async def settle(self) -> None:
        """Wait until no job is queued or running."""
        while True:
            with self._lock:
                jobs = [asyncio.wrap_future(job) for job in self._jobs]
            if not jobs:
                return
            await asyncio.gather(*jobs)

    def maintain(self, cid: int, index: CollectionIndex, current: Current) -> None:
        """After a write: schedule a build if the collection is big enough and has no graph,
        or a save if its graph has changed enough."""
        if index.count < self.threshold or index.building:
            return
        if not index.has_ann:
            self._submit(self._build, cid, index, current)
        elif index.ann_changes >= max(_SAVE_EVERY, index.count // 10):
            self._submit(self._save, cid, index, current)

    def _submit(
        self,
        job: Callable[[int, CollectionIndex, Current], None],
        cid: int,
        index: CollectionIndex,
        current: Current,
    ) -> None:
        if self._executor is None:
            return
        future = self._executor.submit(job, cid, index, current)
        with self._lock:
            self._jobs.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._jobs.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.error("HNSW graph job failed; exact search goes on", exc_info=exc)

    def _save(self, cid: int, index: CollectionIndex, current: Current) -> None:
        if current() and index.ann_changes:
            index.save(self.path(cid))

    def _build(self, cid: int, index: CollectionIndex, current: Current) -> None:
        """Restore the saved graph and catch it up, or build one; then switch to it."""
        if index.has_ann or index.building:
            return
        seqs, vectors = index.begin_build()
        path = self.path(cid)
        try:
            graph = self._restore(index, path, seqs, vectors)
            if graph is None:
                graph = index.new_graph()
                if not index.fill(graph, seqs, vectors, self._stop):
                    index.abandon_build()
                    return
                log.info("%s: HNSW graph built over %d documents", path.name, len(seqs))
        except BaseException:
            index.abandon_build()
            raise
        index.finish_build(graph)
        if current():
            index.save(path)

    def _restore(
        self, index: CollectionIndex, path: Path, seqs: np.ndarray, vectors: np.ndarray
    ) -> Index | None:
        if not path.exists():
            return None
        try:
            graph = Index.restore(str(path))
        except Exception as exc:  # a damaged file is rebuilt from the database, never fatal
            log.warning("%s: cannot restore (%s); rebuilding it", path, exc)
            return None
        if graph is None or graph.ndim != index.dimensions:
            log.warning("%s: not a graph of this collection; rebuilding it", path)
            return None
        indexed = np.asarray(graph.keys, dtype=np.int64)
        stale = np.setdiff1d(indexed, seqs)
        missing = np.isin(seqs, indexed, invert=True)
        if missing.sum() > _CATCH_UP_LIMIT * len(seqs):
            return None
        if len(stale):
            graph.remove(stale.astype(np.uint64))
        if not index.fill(graph, seqs[missing], vectors[missing], self._stop):
            return None
        log.info(
            "%s: graph restored, %d removed and %d added to catch up",
            path.name,
            len(stale),
            int(missing.sum()),
        )
        return graph
