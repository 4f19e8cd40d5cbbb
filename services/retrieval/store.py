"""The local backend's source of truth: one SQLite database in WAL mode.

Tables: ``collections(cid, name, dimensions)``; ``docs(seq, cid, id, metadata, vector)`` with
the unit-normalised float32 vector as a BLOB; and per collection an FTS5 table ``fts_<cid>``
(porter stemming over unicode61 tokens) that holds the text and ranks it with ``bm25()``.
``seq`` is AUTOINCREMENT and never reused: replacing a document gives it a new ``seq``, so an
in-memory structure keyed by ``seq`` can never confuse a stale vector with a live one.

Writes happen in one thread on one connection (``synchronous=FULL``: a commit is on disk when
it returns); reads use pooled read-only connections from any thread.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.retrieval.backend import JSON, Record

SCHEMA_VERSION = 1
_CHUNK = 500  # host parameters per IN (...) list, well under SQLite's limit
_MAX_TERMS = 64
_WORD = re.compile(r"\w+")
_TOKENIZER = "porter unicode61 remove_diacritics 2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    cid INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    dimensions INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS docs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    cid INTEGER NOT NULL REFERENCES collections(cid),
    id TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (cid, id)
);
"""


@dataclass(frozen=True, slots=True)
class StoredCollection:
    cid: int
    name: str
    dimensions: int


@dataclass(frozen=True, slots=True)
class Loaded:
    """A collection's documents as the in-memory index needs them, in ``seq`` order."""

    seqs: np.ndarray  # int64
    vectors: np.ndarray  # float32 (n, dimensions), unit norm
    metadata: list[dict[str, JSON]]


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    text: str
    metadata: dict[str, JSON]


def _chunks(items: Sequence[int] | Sequence[str]) -> Iterator[Sequence[int] | Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


#: English function words: BM25 gives them next to no weight, yet each one's posting list is
#: most of the collection, so a query keeps them only when it has nothing else.
_STOPWORDS_TEXT = """a about above after again all also am an and any are as at be because been
before being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers him his how i if in into is it its itself just me
more most my no nor not of off on once only or other our ours out over own same she should so some
such than that the their theirs them then there these they this those through to too under until
up very was we were what when where which while who whom why will with would you your yours"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def fts_query(text: str) -> str:
    """An FTS5 query matching any word of ``text`` but stopwords (quoted: never syntax)."""
    words = list(dict.fromkeys(t.lower() for t in _WORD.findall(text)))
    terms = [w for w in words if w not in STOPWORDS] or words
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms[:_MAX_TERMS])


class Store:
    """The SQLite database under ``directory``. The constructor does no I/O."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "index.sqlite3"
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self._all_readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # -- lifecycle (writer thread) ------------------------------------------------------------

    def open(self) -> None:
        """Open (creating) the database; from then on call write methods from this thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {version}; this code reads "
                    f"{SCHEMA_VERSION}: upgrade opea-grpc or use another data directory"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        self._writer = conn

    def close(self) -> None:
        """Close every connection (writer thread; readers must be idle)."""
        with self._lock:
            for conn in self._all_readers:
                conn.close()
            self._readers.clear()
            self._all_readers.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @property
    def _w(self) -> sqlite3.Connection:
        if self._writer is None:
            raise RuntimeError("the store is not open")
        return self._writer

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._w
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- reads (any thread) -------------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            with self._lock:
                self._all_readers.append(conn)
        try:
            yield conn
        finally:
            with self._lock:
                self._readers.append(conn)

    def collections(self) -> list[StoredCollection]:
        with self._reader() as conn:
            rows = conn.execute("SELECT cid, name, dimensions FROM collections ORDER BY cid")
            return [StoredCollection(*row) for row in rows]

    def load(self, cid: int, dimensions: int) -> Loaded:
        """Every document of a collection, for the in-memory index (streamed, not buffered)."""
        with self._reader() as conn:
            conn.execute("BEGIN")  # one snapshot for the count and the rows
            try:
                (count,) = conn.execute(
                    "SELECT count(*) FROM docs WHERE cid = ?", (cid,)
                ).fetchone()
                seqs = np.empty(count, dtype=np.int64)
                vectors = np.empty((count, dimensions), dtype=np.float32)
                metadata: list[dict[str, JSON]] = []
                rows = conn.execute(
                    "SELECT seq, metadata, vector FROM docs WHERE cid = ? ORDER BY seq", (cid,)
                )
                for i, (seq, meta, blob) in enumerate(rows):
                    seqs[i] = seq
                    vectors[i] = np.frombuffer(blob, dtype=np.float32)
                    metadata.append(json.loads(meta))
            finally:
                conn.execute("COMMIT")
        return Loaded(seqs=seqs, vectors=vectors, metadata=metadata)

    def lexical(self, cid: int, query: str, limit: int | None) -> list[tuple[int, float]]:
        """``(seq, bm25)`` of documents sharing a word with ``query``, best first (all if no
        ``limit``). Scores are positive, higher is better (FTS5's ``bm25()`` negated)."""
        match = fts_query(query)
        if not match:
            return []
        sql = (
            f"SELECT rowid, bm25(fts_{cid}) AS s FROM fts_{cid} WHERE fts_{cid} MATCH ? ORDER BY s"
        )
        params: tuple[object, ...] = (match,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (match, limit)
        with self._reader() as conn:
            return [(seq, -score) for seq, score in conn.execute(sql, params)]

    def fetch(self, cid: int, seqs: Sequence[int]) -> dict[int, Row]:
        """The stored documents with these ``seq`` (missing ones were deleted meanwhile)."""
        found: dict[int, Row] = {}
        with self._reader() as conn:
            for part in _chunks(seqs):
                rows = conn.execute(
                    f"SELECT d.seq, d.id, d.metadata, f.text FROM docs d "
                    f"JOIN fts_{cid} f ON f.rowid = d.seq WHERE d.seq IN ({_marks(len(part))})",
                    tuple(part),
                )
                for seq, id_, metadata, text in rows:
                    found[seq] = Row(id_, text, json.loads(metadata))
        return found

    # -- writes (writer thread) ---------------------------------------------------------------

    def upsert(
        self,
        cid: int | None,
        name: str,
        records: Sequence[Record],
        vectors: np.ndarray,
    ) -> tuple[int, list[int], list[int]]:
        """Replace-or-insert in one transaction, creating the collection when ``cid`` is None.

        ``vectors`` are the records' vectors, unit-normalised. Returns ``(cid, seqs removed,
        seqs added)``; the transaction is committed (on disk) when this returns.
        """
        added: list[int] = []
        with self._transaction() as conn:
            if cid is None:
                cid = self._create(conn, name, int(vectors.shape[1]))
                removed: list[int] = []
            else:
                removed = self._seqs_of(conn, cid, [r.id for r in records])
                self._remove(conn, cid, removed)
            for record, vector in zip(records, vectors, strict=True):
                cur = conn.execute(
                    "INSERT INTO docs (cid, id, metadata, vector) VALUES (?, ?, ?, ?)",
                    (cid, record.id, _dumps(record.metadata), vector.tobytes()),
                )
                if cur.lastrowid is None:
                    raise RuntimeError("SQLite returned no rowid for a new document")
                added.append(cur.lastrowid)
            conn.executemany(
                f"INSERT INTO fts_{cid} (rowid, text) VALUES (?, ?)",
                zip(added, (r.text for r in records), strict=True),
            )
        return cid, removed, added

    def delete(self, cid: int, ids: Sequence[str], seqs: Sequence[int]) -> list[int]:
        """Delete by id and by ``seq`` in one transaction; the ``seq`` that existed."""
        with self._transaction() as conn:
            doomed = sorted(set(self._seqs_of(conn, cid, ids)) | set(self._existing(conn, seqs)))
            self._remove(conn, cid, doomed)
        return doomed

    def drop(self, cid: int) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM docs WHERE cid = ?", (cid,))
            conn.execute(f"DROP TABLE IF EXISTS fts_{cid}")
            conn.execute("DELETE FROM collections WHERE cid = ?", (cid,))

    @staticmethod
    def _create(conn: sqlite3.Connection, name: str, dimensions: int) -> int:
        cur = conn.execute(
            "INSERT INTO collections (name, dimensions) VALUES (?, ?)", (name, dimensions)
        )
        if cur.lastrowid is None:
            raise RuntimeError("SQLite returned no rowid for a new collection")
        cid = cur.lastrowid
        conn.execute(f"CREATE VIRTUAL TABLE fts_{cid} USING fts5(text, tokenize='{_TOKENIZER}')")
        return cid

    @staticmethod
    def _seqs_of(conn: sqlite3.Connection, cid: int, ids: Sequence[str]) -> list[int]:
        seqs: list[int] = []
        for part in _chunks(ids):
            rows = conn.execute(
                f"SELECT seq FROM docs WHERE cid = ? AND id IN ({_marks(len(part))})",
                (cid, *part),
            )
            seqs.extend(row[0] for row in rows)
        return seqs

    @staticmethod
    def _existing(conn: sqlite3.Connection, seqs: Sequence[int]) -> list[int]:
        found: list[int] = []
        for part in _chunks(seqs):
            rows = conn.execute(
                f"SELECT seq FROM docs WHERE seq IN ({_marks(len(part))})", tuple(part)
            )
            found.extend(row[0] for row in rows)
        return found

    @staticmethod
    def _remove(conn: sqlite3.Connection, cid: int, seqs: Sequence[int]) -> None:
        for part in _chunks(seqs):
            marks = _marks(len(part))
            conn.execute(f"DELETE FROM docs WHERE seq IN ({marks})", tuple(part))
            conn.execute(f"DELETE FROM fts_{cid} WHERE rowid IN ({marks})", tuple(part))


def _dumps(metadata: Mapping[str, JSON]) -> str:
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))
