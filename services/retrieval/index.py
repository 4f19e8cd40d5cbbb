"""The in-memory side of one collection: its vectors for exact search, and an HNSW graph.

Rows hold unit-normalised float32 vectors keyed by the store's ``seq``; deleting a document
clears its row's ``alive`` flag and a compaction drops dead rows once they outnumber the live
ones. Past a size the collection also keeps a usearch HNSW index (cosine) over the same
``seq`` keys; it is built (or restored from disk and caught up) in the background while exact
search keeps answering, then installed and kept in step with every write.

Writers hold :attr:`CollectionIndex.lock` while they change anything. Readers take a
:class:`View` (references to the current arrays, under the lock, in O(1)) and compute without
the lock: writes only append past the view's ``n``, flip ``alive`` flags, or swap in new
arrays, so a view stays self-consistent; the store has the last word on what still exists.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from usearch.index import Index

from services.retrieval.backend import JSON, Condition
from services.retrieval.columns import Columns, evaluate

log = logging.getLogger(__name__)

_MIN_CAPACITY = 1024
_ADD_CHUNK = 4096  # vectors per usearch.add call while building: a stop request waits this long
#: A filtered ANN search asks the graph for this many times the candidates the filter leaves.
_OVERSAMPLE = 2.0
#: Below this many allowed rows, a filtered search goes straight to exact over the subset.
_SMALL_SUBSET = 2048


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); callers guarantee non-zero rows."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    out: np.ndarray = (v / norms).astype(np.float32, copy=False)
    return out


@dataclass(frozen=True, slots=True)
class View:
    """A consistent read-only look at a collection's rows ``[0, n)``."""

    n: int
    seqs: np.ndarray  # int64, row -> seq
    vectors: np.ndarray  # float32 (capacity, d)
    alive: np.ndarray  # bool (capacity,) - shared: flags may flip to False meanwhile
    metadata: list[dict[str, JSON]]
    rows: dict[int, int]  # seq -> row (shared)
    columns: Columns

    def allowed(self, conditions: Sequence[Condition]) -> np.ndarray:
        """Rows that are alive and match every condition (a new bool array of length n)."""
        allowed: np.ndarray = self.alive[: self.n].copy()
        if conditions:
            allowed &= evaluate(self.columns, self.n, conditions)
        return allowed

    def row_of(self, seq: int, allowed: np.ndarray) -> int | None:
        row = self.rows.get(seq)
        if row is None or row >= self.n or not allowed[row]:
            return None
        return row


@dataclass(frozen=True, slots=True)
class AnnParams:
    """When to use the graph (``threshold`` live documents and more) and how to build it."""

    threshold: int
    connectivity: int
    expansion_add: int
    expansion_search: int


class CollectionIndex:
    """Vectors of one collection: exact arrays always, an HNSW index past a size."""

    def __init__(self, dimensions: int, params: AnnParams) -> None:
        self.dimensions = dimensions
        self.params = params
        self.lock = threading.Lock()
        self._n = 0
        self._live = 0
        self._seqs = np.zeros(_MIN_CAPACITY, dtype=np.int64)
        self._vectors = np.zeros((_MIN_CAPACITY, dimensions), dtype=np.float32)
        self._alive = np.zeros(_MIN_CAPACITY, dtype=bool)
        self._metadata: list[dict[str, JSON]] = []
        self._columns = Columns(self._metadata)
        self._rows: dict[int, int] = {}
        self._ann: Index | None = None
        self._building = False
        self._pending: list[tuple[bool, np.ndarray]] = []  # (added?, seqs) while building
        self.ann_changes = 0  # writes applied to the graph since it was last saved

    # -- state --------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._live

    @property
    def has_ann(self) -> bool:
        return self._ann is not None

    @property
    def building(self) -> bool:
        return self._building

    def view(self) -> View:
        with self.lock:
            return View(
                self._n,
                self._seqs,
                self._vectors,
                self._alive,
                self._metadata,
                self._rows,
                self._columns,
            )

    # -- writes (caller holds no lock; one writer thread) -------------------------------------

    def add(
        self, seqs: Sequence[int], vectors: np.ndarray, metadata: list[dict[str, JSON]]
    ) -> None:
        """Append rows (``vectors`` unit-normalised)."""
        keys = np.asarray(seqs, dtype=np.int64)
        with self.lock:
            self._reserve(self._n + len(keys))
            end = self._n + len(keys)
            self._seqs[self._n : end] = keys
            self._vectors[self._n : end] = vectors
            self._alive[self._n : end] = True
            self._metadata.extend(metadata)
            for offset, seq in enumerate(keys.tolist()):
                self._rows[seq] = self._n + offset
            self._n = end
            self._live += len(keys)
            if self._ann is not None:
                self._ann.add(keys.astype(np.uint64), vectors, threads=0)
                self.ann_changes += len(keys)
            elif self._building:
                self._pending.append((True, keys))

    def remove(self, seqs: Sequence[int]) -> None:
        keys = np.asarray(seqs, dtype=np.int64)
        with self.lock:
            gone = [s for s in keys.tolist() if s in self._rows]
            for seq in gone:
                self._alive[self._rows.pop(seq)] = False
            self._live -= len(gone)
            if self._ann is not None and gone:
                self._ann.remove(np.asarray(gone, dtype=np.uint64))
                self.ann_changes += len(gone)
            elif self._building:
                self._pending.append((False, keys))
            if self._n - self._live > max(_MIN_CAPACITY, self._live):
                self._compact()

    def _reserve(self, size: int) -> None:
        capacity = len(self._seqs)
        if size <= capacity:
            return
        capacity = max(size, 2 * capacity)  # exact on a bulk load, doubling as it grows
        seqs = np.zeros(capacity, dtype=np.int64)
        vectors = np.zeros((capacity, self.dimensions), dtype=np.float32)
        alive = np.zeros(capacity, dtype=bool)
        seqs[: self._n] = self._seqs[: self._n]
        vectors[: self._n] = self._vectors[: self._n]
        alive[: self._n] = self._alive[: self._n]
        self._seqs, self._vectors, self._alive = seqs, vectors, alive

    def _compact(self) -> None:
        keep = np.flatnonzero(self._alive[: self._n])
        capacity = max(_MIN_CAPACITY, 2 * len(keep))
        seqs = np.zeros(capacity, dtype=np.int64)
        vectors = np.zeros((capacity, self.dimensions), dtype=np.float32)
        alive = np.zeros(capacity, dtype=bool)
        seqs[: len(keep)] = self._seqs[keep]
        vectors[: len(keep)] = self._vectors[keep]
        alive[: len(keep)] = True
        self._metadata = [self._metadata[row] for row in keep.tolist()]
        self._columns = Columns(self._metadata)
        self._rows = {seq: row for row, seq in enumerate(seqs[: len(keep)].tolist())}
        self._seqs, self._vectors, self._alive, self._n = seqs, vectors, alive, len(keep)

    # -- search -------------------------------------------------------------------------------

    @property
    def uses_ann(self) -> bool:
        """Whether searches go through the graph (installed, and the collection is big)."""
        return self._ann is not None and self._live >= self.params.threshold

    def nearest(
        self, view: View, query: np.ndarray, want: int, allowed: np.ndarray
    ) -> list[tuple[int, float]]:
        """The ``want`` allowed rows closest to ``query`` (unit norm): ``(seq, cosine)``.

        Exact below the threshold, or when a filter leaves few rows; otherwise the graph,
        oversampled in proportion to what the filter removes and post-filtered, with exact
        search over the allowed rows when too few of the graph's answers survive.
        """
        total = int(allowed.sum())
        if total == 0:
            return []
        want = min(want, total)
        filtered = total < self._live
        small = filtered and total < min(_SMALL_SUBSET, self.params.threshold)
        if self.uses_ann and not small:
            found = self._approximate(view, query, want, allowed, total)
            if len(found) >= want:
                return found[:want]
        return _exact(view, query, want, allowed, total)

    def _approximate(
        self, view: View, query: np.ndarray, want: int, allowed: np.ndarray, total: int
    ) -> list[tuple[int, float]]:
        ask = want if total >= self._live else math.ceil(want * _OVERSAMPLE * self._live / total)
        with self.lock:
            if self._ann is None:
                return []
            matches_ = self._ann.search(query, min(ask, max(1, len(self._ann))))
        rows = [r for r in (view.row_of(int(s), allowed) for s in matches_.keys) if r is not None]
        if not rows:
            return []
        picked = np.asarray(rows, dtype=np.int64)
        scores = view.vectors[picked] @ query  # exact cosines: the graph stores f16
        return _ranked(view.seqs[picked], scores)

    # -- ANN lifecycle (builder thread) -------------------------------------------------------

    def begin_build(self) -> tuple[np.ndarray, np.ndarray]:
        """Start recording writes for a graph under construction; the live ``(seqs, vectors)``."""
        with self.lock:
            self._building = True
            self._pending = []
            live = np.flatnonzero(self._alive[: self._n])
            return self._seqs[live].copy(), self._vectors[live].copy()

    def new_graph(self) -> Index:
        p = self.params
        return Index(
            ndim=self.dimensions,
            metric="cos",
            dtype="f16",
            connectivity=p.connectivity,
            expansion_add=p.expansion_add,
            expansion_search=p.expansion_search,
        )

    def fill(
        self, graph: Index, seqs: np.ndarray, vectors: np.ndarray, stop: threading.Event
    ) -> bool:
        """Add ``seqs`` to ``graph`` in chunks; False when ``stop`` was set before the end."""
        for start in range(0, len(seqs), _ADD_CHUNK):
            if stop.is_set():
                return False
            end = start + _ADD_CHUNK
            graph.add(seqs[start:end].astype(np.uint64), vectors[start:end], threads=0)
        return True

    def finish_build(self, graph: Index) -> None:
        """Replay the writes made during the build onto ``graph`` and switch to it."""
        with self.lock:
            for added, seqs in self._pending:
                if added:
                    live = [s for s in seqs.tolist() if s in self._rows and s not in graph]
                    if live:
                        rows = [self._rows[s] for s in live]
                        graph.add(np.asarray(live, dtype=np.uint64), self._vectors[rows])
                else:
                    gone = [s for s in seqs.tolist() if s in graph]
                    if gone:
                        graph.remove(np.asarray(gone, dtype=np.uint64))
            self._pending = []
            self._building = False
            self._ann = graph
            self.ann_changes = 0

    def abandon_build(self) -> None:
        with self.lock:
            self._pending = []
            self._building = False

    def save(self, path: Path) -> None:
        """Write the graph to ``path`` atomically (a crash leaves the old file or the new)."""
        tmp = path.with_suffix(".tmp")
        with self.lock:
            if self._ann is None:
                return
            self._ann.save(str(tmp))
            self.ann_changes = 0
        tmp.replace(path)


def _ranked(seqs: np.ndarray, scores: np.ndarray) -> list[tuple[int, float]]:
    order = np.lexsort((seqs, -scores))
    return [(int(seqs[i]), float(scores[i])) for i in order]


def _exact(
    view: View, query: np.ndarray, want: int, allowed: np.ndarray, total: int
) -> list[tuple[int, float]]:
    if total < view.n // 4:
        rows = np.flatnonzero(allowed)
        scores = view.vectors[rows] @ query
    else:
        scores = view.vectors[: view.n] @ query
        scores[~allowed] = -np.inf
        rows = np.arange(view.n)
    if want < len(scores):
        top = np.argpartition(-scores, want - 1)[:want]
        rows, scores = rows[top], scores[top]
    keep = np.isfinite(scores)
    return _ranked(view.seqs[rows[keep]], scores[keep])
