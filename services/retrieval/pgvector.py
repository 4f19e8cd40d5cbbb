"""The ``pgvector`` retrieval backend: PostgreSQL with the pgvector extension (>= 0.5), asyncpg.

Layout, created on first use (the role needs CREATE on its schema, and the right to CREATE
EXTENSION unless ``vector`` is installed already)::

    opea_collections (id bigserial, name text unique, dimensions int)
    opea_docs_<id>   (id text COLLATE "C" primary key, text, metadata jsonb,
                      embedding vector(<dimensions>),
                      tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)
                     + HNSW (vector_cosine_ops, m / ef_construction from the ann_* settings)
                     + GIN on tsv

One table per collection, named by the collection's numeric id (never by its name, which is
caller input), so each has a typed ``vector(n)`` column that HNSW can index, and dropping a
collection is a ``DROP TABLE``. Upserts are one ``INSERT ... ON CONFLICT (id) DO UPDATE`` per
request, in a transaction that holds the collection's row FOR SHARE (a concurrent drop waits).

Dense search asks the HNSW index for one row more than it needs (``hnsw.ef_search`` raised to
cover it; tenfold when filtered, since pgvector filters after the index). When the index yields
fewer rows (a selective filter, a small table) or a tie straddles the cut, the query runs again
exactly (``ORDER BY distance, id``), so ``top_k`` hits come back whenever ``top_k`` documents
match, ties in id order. Lexical search ranks by ``ts_rank_cd`` over any query word (English
stemming, PostgreSQL's nearest equivalent of BM25); hybrid fuses both by
:func:`services.retrieval.fusion.rrf`. Filters become SQL over ``jsonb`` with bind parameters
only (:func:`where_sql`), with the semantics of :mod:`services.retrieval.filters`.

Errors: unknown collection NOT_FOUND, wrong dimension or a value PostgreSQL cannot hold (NUL)
INVALID_ARGUMENT, database unreachable UNAVAILABLE, write conflict ABORTED. An unreachable
database at start is not fatal: health reads NOT_SERVING until it answers (probed on a
connection outside the pool); bad credentials, database or rights fail ``start``.

>>> backend = PgvectorBackend(Settings(backend="pgvector", dsn="postgresql://u:p@db/rag"))
>>> await backend.start()
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import grpc
from pgvector import Vector as PgVector
from pgvector.asyncpg import register_vector

from opea_grpc.config import ConfigError
from opea_grpc.errors import ServiceError
from services.retrieval.backend import (
    CollectionInfo,
    Hit,
    Record,
    Vector,
    unknown_collection,
    wrong_dimension,
)
from services.retrieval.filters import LISTED, ORDERED, Condition, Op
from services.retrieval.fusion import hybrid

if TYPE_CHECKING:
    from services.retrieval.service import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds to open one connection.
CONNECT_TIMEOUT = 10.0
#: Seconds a readiness probe waits to connect and for ``SELECT 1``.
PROBE_TIMEOUT = 2.0
#: pgvector cannot index ``vector`` columns wider than this with HNSW (searches scan instead).
HNSW_MAX_DIMENSIONS = 2000
#: pgvector's upper bound for ``hnsw.ef_search``.
EF_SEARCH_MAX = 1000
#: Text search configuration: English stemming, like the local backend's porter tokenizer.
TEXT_SEARCH = "english"
#: Key of the advisory lock that serialises schema creation between replicas.
_SCHEMA_LOCK = 0x6F706561  # "opea"

#: Failures that mean "the database is not reachable right now" (-> UNAVAILABLE).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # A pooled connection the server closed while the loop was busy reports a protocol state
    # error on next use; the pool then drops it.
    asyncpg.InternalClientError,
)
#: Failures to open the store that no retry fixes: wrong credentials, database or rights.
SETUP_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InsufficientPrivilegeError,
    asyncpg.UndefinedFileError,
)

_PROBE_ERRORS: tuple[type[BaseException], ...] = (ServiceError, *CONNECTION_ERRORS, *SETUP_ERRORS)
_COLUMNS = "id, text, metadata"
#: Stands for the collection's table in SQL templates (str.format would trip on jsonb's '{}').
_TABLE = "@table@"
_SQL_OP = {Op.GT: ">", Op.GTE: ">=", Op.LT: "<", Op.LTE: "<="}


@dataclass(frozen=True, slots=True)
class _Collection:
    id: int
    dimensions: int

    @property
    def table(self) -> str:
        # From our own integer id: safe to put in SQL text.
        return f"opea_docs_{self.id:d}"

    def sql(self, template: str) -> str:
        """``template`` with :data:`_TABLE` replaced by this collection's table."""
        return template.replace(_TABLE, self.table)


def where_sql(conditions: Sequence[Condition], params: list[object]) -> str:
    """SQL that holds where every condition does; appends the bind values to ``params``.

    Placeholders continue from ``len(params)``. Keys and values only ever travel as bind
    parameters; the SQL text depends on the conditions' shape (operators, key depth, value
    kinds) alone.
    """

    def bind(value: object) -> str:
        params.append(value)
        return f"${len(params)}"

    clauses = []
    for c in conditions:
        # ``->`` with a text key walks objects only (an array or scalar step gives NULL),
        # exactly like filters.lookup; ``#>`` would also index into arrays.
        path = "metadata" + "".join(f" -> {bind(part)}::text" for part in c.key.split("."))
        if c.op in LISTED:
            values = bind(list(c.value))  # type: ignore[arg-type]
            inside = (
                f"coalesce(({path}) = ANY(ARRAY(SELECT jsonb_array_elements({values}::jsonb))),"
                " false)"
            )
            clauses.append(inside if c.op is Op.IN else f"NOT {inside}")
        elif c.op is Op.EQ or c.op is Op.NE:
            # jsonb equality: numbers numerically, strings exactly, true is not 1.
            equal = f"coalesce(({path}) = {bind(c.value)}::jsonb, false)"
            clauses.append(equal if c.op is Op.EQ else f"NOT {equal}")
        elif c.op in ORDERED and isinstance(c.value, str):
            clauses.append(
                f"coalesce(CASE WHEN jsonb_typeof({path}) = 'string' THEN "
                f"(({path}) #>> '{{}}') COLLATE \"C\" {_SQL_OP[c.op]} {bind(c.value)}::text "
                "END, false)"
            )
        else:  # ordered, numeric; CASE keeps the cast away from strings and bools
            clauses.append(
                f"coalesce(CASE WHEN jsonb_typeof({path}) = 'number' THEN "
                f"({path})::float8 {_SQL_OP[c.op]} {bind(float(c.value))}::float8 "  # type: ignore[arg-type]
                "END, false)"
            )
    return " AND ".join(clauses) if clauses else "true"


def _hit(row: Any, score: float) -> Hit:
    return Hit(id=row["id"], text=row["text"], metadata=row["metadata"], score=score)


def _best_first(hits: list[Hit]) -> list[Hit]:
    return sorted(hits, key=lambda h: (-h.score, h.id))


async def _init_connection(conn: Any, vector_schema: str) -> None:
    await register_vector(conn, schema=vector_schema)
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: json.dumps(v, allow_nan=False, separators=(",", ":")),
        decoder=json.loads,
        format="text",
    )


async def _keep_session(conn: Any) -> None:
    """Pool reset that sends nothing: we never change session state (no SET, LISTEN, cursors,
    session locks; settings change only with SET LOCAL inside transactions), so asyncpg's
    default ``RESET ALL ...`` would cost a round trip per call for nothing."""


class PgvectorBackend:
    """Collections in PostgreSQL tables, searched with pgvector HNSW and full-text search."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self._probing = asyncio.Lock()
        self._probe: Any = None  # a connection of its own: a busy pool is not a dead database
        self._collections: dict[str, _Collection] = {}
        self._reachable = True
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool and create the schema. An unreachable database is not fatal here
        (health reads NOT_SERVING until it answers); bad credentials or rights are."""
        try:
            await self._open()
        except ServiceError as exc:
            if exc.code is not grpc.StatusCode.UNAVAILABLE:
                raise ConfigError(exc.message) from None
            log.warning("%s; will retry", exc.message)

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.terminate()
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT)
            except asyncio.TimeoutError:
                pool.terminate()

    async def ready(self) -> bool:
        """Whether the database answers ``SELECT 1`` (on a connection outside the pool, so
        that a pool busy with searches does not read as a database that is down)."""
        try:
            await self._open()
            async with self._probing:
                await self._ping()
        except _PROBE_ERRORS as exc:
            self._note_reachable(False, exc)
            return False
        self._note_reachable(True, None)
        return True

    async def _ping(self) -> None:
        if self._probe is None or self._probe.is_closed():
            self._probe = await asyncpg.connect(
                self._settings.dsn,
                timeout=PROBE_TIMEOUT,
                server_settings={"application_name": "opea-retrieval-health"},
            )
        try:
            await self._probe.fetchval("SELECT 1", timeout=PROBE_TIMEOUT)
        except BaseException:
            probe, self._probe = self._probe, None
            probe.terminate()
            raise

    def _note_reachable(self, ok: bool, exc: BaseException | None) -> None:
        if ok and not self._reachable:
            log.info("database %s reachable again", self._where())
        elif not ok and self._reachable:
            log.warning("database %s unreachable: %s", self._where(), exc)
        self._reachable = ok

    def _where(self) -> str:
        """``host:port/db`` of the DSN, for messages: never the user or the password."""
        parts = urlsplit(self._settings.dsn)
        return parts.netloc.rpartition("@")[2] + parts.path

    def _unreachable(self, exc: BaseException) -> ServiceError:
        self._note_reachable(False, exc)
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"database {self._where()} unreachable ({type(exc).__name__}: {exc}): "
            "check that PostgreSQL is running and OPEA_RETRIEVAL_DSN points at it",
        )

    async def _open(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._closed:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "retrieval backend is closed")
        async with self._opening:
            if self._pool is None:
                self._pool = await self._create_pool()
        return self._pool

    async def _create_pool(self) -> Any:
        s = self._settings
        try:
            conn = await asyncpg.connect(s.dsn, timeout=CONNECT_TIMEOUT)
            try:
                vector_schema = await self._create_schema(conn)
            finally:
                await conn.close()
            return await asyncpg.create_pool(
                s.dsn,
                # No floor: asyncpg would keep re-dialling a database that is down, logging a
                # traceback each time; connections open on demand and idle out after 5 min.
                min_size=0,
                max_size=s.pool_size,
                timeout=CONNECT_TIMEOUT,
                init=functools.partial(_init_connection, vector_schema=vector_schema),
                reset=_keep_session,
                # Set at connection start-up (no SET per call); raised per query by SET LOCAL.
                server_settings={
                    "hnsw.ef_search": str(min(s.ann_expansion_search, EF_SEARCH_MAX)),
                    "application_name": "opea-retrieval",
                },
            )
        except CONNECTION_ERRORS as exc:
            raise self._unreachable(exc) from None
        except SETUP_ERRORS as exc:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"database {self._where()} refused the retrieval backend "
                f"({type(exc).__name__}: {exc}): check OPEA_RETRIEVAL_DSN's user, password and "
                "database, and that the vector extension is installed (CREATE EXTENSION vector, "
                "as a superuser) and the user may create tables",
            ) from None

    @staticmethod
    async def _create_schema(conn: Any) -> str:
        """Create what is missing; return the schema the vector extension lives in."""
        find = (
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname = 'vector'"
        )
        async with conn.transaction():
            # Replicas starting together must not race on CREATE ... IF NOT EXISTS.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            vector_schema: str | None = await conn.fetchval(find)
            if vector_schema is None:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                vector_schema = await conn.fetchval(find)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS opea_collections ("
                " id bigserial PRIMARY KEY,"
                ' name text COLLATE "C" NOT NULL UNIQUE,'
                " dimensions integer NOT NULL CHECK (dimensions > 0))"
            )
        return vector_schema or "public"

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        pool = await self._open()
        try:
            async with pool.acquire() as conn:
                yield conn
        except CONNECTION_ERRORS as exc:
            raise self._unreachable(exc) from None
        except asyncpg.TransactionRollbackError as exc:  # class 40: deadlock, serialization
            raise ServiceError(
                grpc.StatusCode.ABORTED, f"a concurrent write conflicted ({exc}): retry"
            ) from None
        except asyncpg.DataError as exc:  # SQLSTATE class 22: a value PostgreSQL cannot hold
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"PostgreSQL cannot store or compare a value of this request ({exc}); "
                "text, ids and metadata must not contain NUL (\\u0000) characters",
            ) from None
        self._note_reachable(True, None)

    # -- collections --------------------------------------------------------------------------

    async def _resolve(self, conn: Any, name: str) -> _Collection:
        found = self._collections.get(name)
        if found is not None:
            return found
        row = await conn.fetchrow(
            "SELECT id, dimensions FROM opea_collections WHERE name = $1", name
        )
        if row is None:
            names = await conn.fetch('SELECT name FROM opea_collections ORDER BY name COLLATE "C"')
            raise unknown_collection(name, [r["name"] for r in names])
        found = _Collection(row["id"], row["dimensions"])
        self._collections[name] = found
        return found

    async def collections(self) -> list[CollectionInfo]:
        infos = []
        async with self._connection() as conn:
            rows = await conn.fetch(
                'SELECT id, name, dimensions FROM opea_collections ORDER BY name COLLATE "C"'
            )
            for row in rows:
                coll = _Collection(row["id"], row["dimensions"])
                try:
                    count = await conn.fetchval(f"SELECT count(*) FROM {coll.table}")
                except asyncpg.UndefinedTableError:
                    continue  # dropped meanwhile
                infos.append(CollectionInfo(row["name"], row["dimensions"], count))
        return infos

    async def drop(self, collection: str) -> bool:
        self._collections.pop(collection, None)
        async with self._connection() as conn, conn.transaction():
            # Waits for upserts holding the row FOR SHARE; DROP waits for readers of the table.
            coll_id = await conn.fetchval(
                "DELETE FROM opea_collections WHERE name = $1 RETURNING id", collection
            )
            if coll_id is None:
                return False
            await conn.execute(f"DROP TABLE IF EXISTS {_Collection(coll_id, 1).table}")
        return True

    async def _create_collection(self, conn: Any, name: str, dimensions: int) -> _Collection:
        coll_id = await conn.fetchval(
            "INSERT INTO opea_collections (name, dimensions) VALUES ($1, $2) "
            "ON CONFLICT (name) DO NOTHING RETURNING id",
            name,
            dimensions,
        )
        if coll_id is None:  # created concurrently (and committed: the INSERT waited for it)
            row = await conn.fetchrow(
                "SELECT id, dimensions FROM opea_collections WHERE name = $1 FOR SHARE", name
            )
            if row is None:
                raise ServiceError(
                    grpc.StatusCode.ABORTED,
                    f"collection {name!r} was dropped while this upsert created it: retry",
                )
            return _Collection(row["id"], row["dimensions"])
        s = self._settings
        coll = _Collection(coll_id, dimensions)
        table = coll.table
        await conn.execute(
            f"CREATE TABLE {table} ("
            ' id text COLLATE "C" PRIMARY KEY,'
            " text text NOT NULL,"
            " metadata jsonb NOT NULL,"
            f" embedding vector({dimensions:d}) NOT NULL,"
            " tsv tsvector GENERATED ALWAYS AS "
            f"(to_tsvector('{TEXT_SEARCH}'::regconfig, text)) STORED)"
        )
        await conn.execute(f"CREATE INDEX {table}_tsv ON {table} USING gin (tsv)")
        if dimensions <= HNSW_MAX_DIMENSIONS:
            # pgvector's ranges: m 2..100, ef_construction 4..1000 and at least 2 * m.
            m = min(max(s.ann_connectivity, 2), 100)
            ef_construction = min(max(s.ann_expansion_add, 2 * m), 1000)
            await conn.execute(
                f"CREATE INDEX {table}_embedding ON {table} "
                f"USING hnsw (embedding vector_cosine_ops) "
                f"WITH (m = {m:d}, ef_construction = {ef_construction:d})"
            )
        else:
            log.warning(
                "collection %r: %d dimensions is more than HNSW indexes (%d); searches scan it",
                name,
                dimensions,
                HNSW_MAX_DIMENSIONS,
            )
        log.info("created collection %r (%d dimensions) as %s", name, dimensions, table)
        return coll

    # -- writes -------------------------------------------------------------------------------

    async def upsert(self, collection: str, records: Sequence[Record]) -> int:
        if not records:
            return 0
        # Rows are locked in id order, so concurrent upserts of overlapping ids cannot deadlock.
        records = sorted(records, key=lambda r: r.id)
        dimensions = len(records[0].vector)
        try:
            metadata = [dict(r.metadata) for r in records]
            json.dumps(metadata, allow_nan=False)  # fail before the transaction, not inside
        except ValueError:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "documents[].metadata holds a NaN or infinite number: JSON cannot carry it",
            ) from None
        async with self._connection() as conn, conn.transaction():
            # FOR SHARE: a concurrent drop waits for this write instead of racing it.
            row = await conn.fetchrow(
                "SELECT id, dimensions FROM opea_collections WHERE name = $1 FOR SHARE",
                collection,
            )
            if row is None:
                coll = await self._create_collection(conn, collection, dimensions)
            else:
                coll = _Collection(row["id"], row["dimensions"])
            for i, r in enumerate(records):
                if len(r.vector) != coll.dimensions:
                    raise wrong_dimension(
                        collection, coll.dimensions, len(r.vector), f"documents[{i}].embedding"
                    )
            await conn.execute(
                f"INSERT INTO {coll.table} (id, text, metadata, embedding) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::vector[]) "
                "ON CONFLICT (id) DO UPDATE SET text = EXCLUDED.text, "
                "metadata = EXCLUDED.metadata, embedding = EXCLUDED.embedding",
                [r.id for r in records],
                [r.text for r in records],
                metadata,
                # Wrapped: asyncpg would walk a bare ndarray as a nested array.
                [PgVector(r.vector) for r in records],
            )
        self._collections[collection] = coll
        return len(records)

    async def delete(
        self, collection: str, ids: Sequence[str], conditions: Sequence[Condition]
    ) -> int:
        params: list[object] = [list(ids)]
        where = "id = ANY($1::text[])"
        if conditions:
            where += f" OR ({where_sql(conditions, params)})"
        sql = f"WITH gone AS (DELETE FROM {_TABLE} WHERE " + where + " RETURNING 1) "
        sql += "SELECT count(*) FROM gone"
        count: int = await self._retry(
            collection, lambda conn, coll: conn.fetchval(coll.sql(sql), *params)
        )
        return count

    async def _retry(self, collection: str, query: Callable[[Any, _Collection], Awaitable[T]]) -> T:
        """``query(conn, coll)`` on the collection; once more, looked up afresh, if it failed
        on a table that vanished or on a dimension.

        The id and dimension are cached, but another replica may drop (and recreate) the
        collection: the old table goes, the dimension may change. A fresh lookup finds the new
        table or reports NOT_FOUND. ``query`` must be a single idempotent statement (or its
        own transaction).
        """
        async with self._connection() as conn:
            coll = await self._resolve(conn, collection)
            try:
                return await query(conn, coll)
            except asyncpg.UndefinedTableError:
                pass
            except ServiceError as exc:
                if exc.code is not grpc.StatusCode.INVALID_ARGUMENT:
                    raise
            self._collections.pop(collection, None)
            return await query(conn, await self._resolve(conn, collection))

    # -- search -------------------------------------------------------------------------------

    async def search(
        self,
        collection: str,
        vector: Vector | None,
        query: str,
        top_k: int,
        conditions: Sequence[Condition],
        score_threshold: float | None,
    ) -> list[Hit]:
        if vector is not None and query:
            n = max(top_k * 4, self._settings.hybrid_candidates)
            dense, lexical = await asyncio.gather(
                self._dense(collection, vector, n, conditions),
                self._lexical(collection, query, n, conditions),
            )
            by_id = {h.id: h for h in (*dense, *lexical)}
            settings = self._settings
            fused = hybrid(
                [(h.id, h.score) for h in dense],
                [(h.id, h.score) for h in lexical],
                method=settings.fusion,
                rrf_k=settings.rrf_k,
                dense_weight=settings.dense_weight,
                lexical_complete=len(lexical) < n,
            )
            hits = _best_first(
                [Hit(by_id[i].id, by_id[i].text, by_id[i].metadata, score) for i, score in fused]
            )
        elif vector is not None:
            hits = await self._dense(collection, vector, top_k, conditions)
        else:
            hits = await self._lexical(collection, query, top_k, conditions)
        if score_threshold is not None:
            hits = [h for h in hits if h.score >= score_threshold]
        return hits[:top_k]

    async def _dense(
        self, collection: str, vector: Vector, n: int, conditions: Sequence[Condition]
    ) -> list[Hit]:
        params: list[object] = [vector, n + 1]
        where = where_sql(conditions, params)
        select = f"SELECT {_COLUMNS}, 1 - (embedding <=> $1) AS score FROM {_TABLE} WHERE {where}"
        # HNSW can only produce "ORDER BY distance": ask for one row more than needed, to see
        # a tie at the cut. The exact query (", id": no index can serve it) settles ties by id.
        ann_sql = select + " ORDER BY embedding <=> $1 LIMIT $2"
        exact_sql = select + " ORDER BY embedding <=> $1, id LIMIT $2 - 1"
        ef = self._ef_search(n + 1, filtered=bool(conditions))

        async def run(conn: Any, coll: _Collection) -> list[Any]:
            if len(vector) != coll.dimensions:
                raise wrong_dimension(collection, coll.dimensions, len(vector), "the query vector")
            if ef is None:
                rows: list[Any] = await conn.fetch(coll.sql(ann_sql), *params)
            else:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('hnsw.ef_search', $1, true)", str(ef))
                    rows = await conn.fetch(coll.sql(ann_sql), *params)
            if len(rows) <= n or rows[n - 1]["score"] == rows[n]["score"]:
                # The index ran dry (a filter, a small table) or a tie straddles the cut.
                rows = await conn.fetch(coll.sql(exact_sql), *params)
            return rows[:n]

        rows = await self._retry(collection, run)
        return _best_first([_hit(r, float(r["score"])) for r in rows])

    def _ef_search(self, rows: int, *, filtered: bool) -> int | None:
        """The ``hnsw.ef_search`` a query needs (None: the connection's default will do).

        The index yields at most ef_search rows, before any filter: a filtered query asks for
        ten times its rows, so that the exact fallback stays for selective filters.
        """
        base = min(self._settings.ann_expansion_search, EF_SEARCH_MAX)
        want = min(rows * 10 if filtered else rows, EF_SEARCH_MAX)
        return want if want > base else None

    async def _lexical(
        self, collection: str, query: str, n: int, conditions: Sequence[Condition]
    ) -> list[Hit]:
        params: list[object] = [query, n]
        where = where_sql(conditions, params)
        # Any query word may match, as in BM25: plainto_tsquery joins words with & (and
        # hyphenated parts with <->); turn every operator into |. Lexemes are quoted and never
        # hold a space, so only operators match the pattern.
        sql = (
            f"WITH q AS (SELECT regexp_replace(plainto_tsquery('{TEXT_SEARCH}'::regconfig, $1)"
            "::text, ' (&|<->|<[0-9]+>) ', ' | ', 'g')::tsquery AS q) "
            f"SELECT {_COLUMNS}, ts_rank_cd(tsv, q.q, 1) AS score FROM {_TABLE}, q "
            f"WHERE tsv @@ q.q AND {where} ORDER BY score DESC, id LIMIT $2"
        )
        rows = await self._retry(collection, lambda conn, coll: conn.fetch(coll.sql(sql), *params))
        return [_hit(r, float(r["score"])) for r in rows]
