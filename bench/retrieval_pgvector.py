"""Retrieval search latency through gRPC: the ``local`` backend against ``pgvector``.

Each backend runs as ``python -m services.retrieval --backend B`` (pgvector on the PostgreSQL 16
+ pgvector that the ``pgserver`` wheel bundles, started here, or on ``--dsn``). The bench loads
``--n`` documents of ``--dim`` dimensions through Upsert (batches of 1000, ``--writers`` at a
time), waits until the index is complete (local: its HNSW graph is built; pgvector: ANALYZE),
then one client searches sequentially (concurrency 1), ``top_k`` 10, in four modes:

- ``dense``: the vector only;
- ``filter 50%``: the vector and ``half == 0`` (half the documents match);
- ``filter 1%``: the vector and ``pct == 0`` (one in a hundred matches);
- ``hybrid``: the vector and two words of text (dense + lexical, fused by RRF).

Vectors and texts are synthetic unless ``--vectors`` / ``--queries`` give ``.npy`` files of
real ones (e.g. MiniLM embeddings of a corpus; the first ``--n`` rows are loaded), with
``--texts`` / ``--query-texts`` (one per line, aligned with the vectors) for hybrid search.

Reported per mode: client-side p50/p95 latency, recall@10 against exact search (numpy), and CPU
per search of the service process (plus, for pgvector, of the PostgreSQL processes).

    python bench/retrieval_pgvector.py [--n 100000] [--dim 384] [--queries-count 300]
                                       [--backends local,pgvector] [--dsn postgresql://...]
    python bench/retrieval_pgvector.py --vectors corpus.npy --queries queries.npy
                                       [--texts corpus.txt] [--query-texts queries.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from opea_grpc.channel import connect  # noqa: E402
from opea_grpc.client import RetrievalClient  # noqa: E402
from opea_grpc.config import ClientConfig  # noqa: E402
from opea_grpc.pb.v1 import common_pb2, retrieval_pb2  # noqa: E402
from services.retrieval.service import Settings  # noqa: E402
from tests.services.pg import PostgresServer  # noqa: E402

COLLECTION = "bench"
BATCH = 1000
TOP_K = 10
LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
CLIENT = ClientConfig(max_attempts=1, health_check=False, timeout=120)


@dataclass(frozen=True)
class Corpus:
    vectors: np.ndarray  # (n, dim) float32
    texts: list[str]
    queries: np.ndarray  # (q, dim) float32
    query_texts: list[str]


def make_corpus(n: int, dim: int, queries: int, seed: int = 0) -> Corpus:
    """Vectors around ``n / 100`` centres (neighbours are clear, as with real embeddings),
    texts of 8 words from a 5000-word vocabulary; queries near documents, not on them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 100, 1), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)]
    vectors += 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    picks = rng.integers(0, n, queries)
    noise = 0.1 * rng.standard_normal((queries, dim)).astype(np.float32)
    query_vectors = vectors[picks] + noise
    vocab = [f"w{i}" for i in range(5000)]
    words = [[vocab[j] for j in rng.integers(0, len(vocab), 8)] for _ in range(n)]
    query_words = [f"{words[p][0]} {vocab[rng.integers(0, len(vocab))]}" for p in picks]
    return Corpus(vectors, [" ".join(w) for w in words], query_vectors, query_words)


def lines(path: str, count: int) -> list[str]:
    with open(path, encoding="utf-8") as stream:
        out = [line.rstrip("\n") for _, line in zip(range(count), stream, strict=False)]
    if len(out) < count:
        raise SystemExit(f"{path}: {len(out)} lines, {count} needed (one per vector)")
    return out


def load_corpus(args: argparse.Namespace) -> Corpus:
    """``--vectors`` / ``--queries`` (and their texts), or the synthetic corpus."""
    if not args.vectors:
        if args.queries or args.texts or args.query_texts:
            raise SystemExit("--queries, --texts and --query-texts need --vectors")
        return make_corpus(args.n, args.dim, args.queries_count)
    if not args.queries:
        raise SystemExit("--vectors needs --queries (a .npy of query vectors)")
    vectors = np.load(args.vectors, mmap_mode="r")[: args.n].astype(np.float32)
    queries = np.load(args.queries)[: args.queries_count].astype(np.float32)
    if vectors.ndim != 2 or queries.ndim != 2 or queries.shape[1] != vectors.shape[1]:
        raise SystemExit(f"shapes {vectors.shape} and {queries.shape}: expected (n, d), (q, d)")
    synthetic = synthetic_words(len(vectors), len(queries))
    texts = lines(args.texts, len(vectors)) if args.texts else synthetic[0]
    query_texts = lines(args.query_texts, len(queries)) if args.query_texts else synthetic[1]
    return Corpus(vectors, texts, queries, query_texts)


def synthetic_words(n: int, queries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Texts of 8 words and two-word queries, for real vectors given without texts."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(5000)])
    texts = [" ".join(row) for row in vocab[rng.integers(0, len(vocab), (n, 8))]]
    return texts, [" ".join(row) for row in vocab[rng.integers(0, len(vocab), (queries, 2))]]


def exact_top(corpus: Corpus, allowed: np.ndarray) -> list[set[str]]:
    unit = corpus.vectors / np.linalg.norm(corpus.vectors, axis=1, keepdims=True)
    q = corpus.queries / np.linalg.norm(corpus.queries, axis=1, keepdims=True)
    out: list[set[str]] = []
    for start in range(0, len(q), 64):
        scores = q[start : start + 64] @ unit.T
        scores[:, ~allowed] = -np.inf
        top = np.argpartition(-scores, TOP_K, axis=1)[:, :TOP_K]
        out.extend({f"d{i}" for i in row} for row in top)
    return out


def documents(corpus: Corpus, start: int, stop: int) -> list[common_pb2.Document]:
    docs = []
    for i in range(start, stop):
        d = common_pb2.Document(
            id=f"d{i}", text=corpus.texts[i], embedding=corpus.vectors[i].tolist()
        )
        d.metadata.update({"half": i % 2, "pct": i % 100})
        docs.append(d)
    return docs


class Service:
    """``python -m services.retrieval`` as a child process, its stderr watched for a pattern."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.target = ""
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.retrieval", "--port", "0", "--host", "127.0.0.1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 120)).decode()
        found = LISTENING.search(line)
        if not found:
            raise RuntimeError(f"service did not start: {line!r}")
        self.target = f"{found[1]}:{found[2]}"
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())

    async def wait_for_log(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(pattern in line for line in self.lines):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line with {pattern!r} in {timeout} s")
            await asyncio.sleep(0.5)  # polling a log: the bench has no other signal

    def cpu(self) -> float:
        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def postgres_cpu(pg: PostgresServer | None) -> float:
    """CPU seconds of every process of the bench's PostgreSQL (0 for an external one)."""
    if pg is None or pg.pid is None:
        return 0.0
    total = 0.0
    root = psutil.Process(pg.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


@dataclass(frozen=True)
class Mode:
    name: str
    request: Callable[[int], retrieval_pb2.SearchRequest]
    truth: list[set[str]] | None


def modes(corpus: Corpus) -> list[Mode]:
    def condition(key: str) -> common_pb2.Filter:
        c = common_pb2.Condition(key=key, operator=common_pb2.OPERATOR_EQ)
        c.value.number_value = 0
        return common_pb2.Filter(conditions=[c])

    n = len(corpus.vectors)
    ids = np.arange(n)

    def req(i: int, **extra: object) -> retrieval_pb2.SearchRequest:
        return retrieval_pb2.SearchRequest(
            collection=COLLECTION,
            vector=corpus.queries[i].tolist(),
            top_k=TOP_K,
            **extra,  # type: ignore[arg-type]
        )

    half, pct = condition("half"), condition("pct")
    return [
        Mode("dense", lambda i: req(i), exact_top(corpus, np.ones(n, dtype=bool))),
        Mode("filter 50%", lambda i: req(i, filter=half), exact_top(corpus, ids % 2 == 0)),
        Mode("filter 1%", lambda i: req(i, filter=pct), exact_top(corpus, ids % 100 == 0)),
        Mode("hybrid", lambda i: req(i, query=corpus.query_texts[i]), None),
    ]


async def load(client: RetrievalClient, corpus: Corpus, writers: int) -> float:
    n = len(corpus.vectors)
    starts = list(range(0, n, BATCH))
    began = time.perf_counter()

    async def writer(k: int) -> None:
        for start in starts[k::writers]:
            request = retrieval_pb2.UpsertRequest(
                collection=COLLECTION, documents=documents(corpus, start, min(start + BATCH, n))
            )
            await client.upsert(request, timeout=600)

    await asyncio.gather(*(writer(k) for k in range(writers)))
    return n / (time.perf_counter() - began)


async def measure(
    client: RetrievalClient, mode: Mode, queries: int, cpu: Callable[[], float]
) -> dict[str, float]:
    for i in range(min(30, queries)):  # warm-up: connections, caches, prepared statements
        await client.search(mode.request(i))
    latencies, recalls = [], []
    cpu0 = cpu()
    for i in range(queries):
        request = mode.request(i)
        began = time.perf_counter()
        reply = await client.search(request)
        latencies.append(time.perf_counter() - began)
        if mode.truth is not None:
            found = {d.document.id for d in reply.documents}
            recalls.append(len(found & mode.truth[i]) / TOP_K)
    cpu_ms = (cpu() - cpu0) / queries * 1000
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
        "recall": statistics.mean(recalls) if recalls else float("nan"),
        "cpu_ms": cpu_ms,
    }


async def run_backend(
    backend: str, corpus: Corpus, args: argparse.Namespace, dsn: str, pg: PostgresServer | None
) -> dict[str, object]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPEA_LOG_LEVEL": "INFO",
        "OPEA_RETRIEVAL_BACKEND": backend,
        "OPEA_RETRIEVAL_MAX_BATCH": str(BATCH),
    }
    tmp = tempfile.TemporaryDirectory(prefix="bench-retrieval-")
    if backend == "local":
        env["OPEA_RETRIEVAL_DATA_DIR"] = str(Path(tmp.name) / "index")
    else:
        env["OPEA_RETRIEVAL_DSN"] = dsn
    service = Service(env)
    await service.start()
    channel = connect(service.target, [RetrievalClient.SERVICE], CLIENT)
    client = RetrievalClient(channel, timeout=120)
    try:
        for c in (await client.list_collections()).collections:
            if c.name == COLLECTION:
                await client.delete_collection(COLLECTION)
        rate = await load(client, corpus, args.writers)
        began = time.perf_counter()
        if backend == "local":
            if len(corpus.vectors) >= Settings().ann_threshold:
                await service.wait_for_log("graph built", timeout=3600)
        else:
            conn = await asyncpg.connect(dsn)
            try:
                cid = await conn.fetchval(
                    "SELECT id FROM opea_collections WHERE name = $1", COLLECTION
                )
                await conn.execute(f"VACUUM ANALYZE opea_docs_{int(cid)}")
            finally:
                await conn.close()
        settle = time.perf_counter() - began
        results: dict[str, object] = {"insert_docs_per_s": rate, "settle_s": settle}

        def cpu() -> float:
            return service.cpu() + postgres_cpu(pg)

        for mode in modes(corpus):
            results[mode.name] = await measure(client, mode, len(corpus.queries), cpu)
        await client.delete_collection(COLLECTION)
        return results
    finally:
        await channel.close(None)
        await service.stop()
        tmp.cleanup()


def report(backend: str, results: dict[str, object]) -> None:
    print(
        f"\n{backend}: insert {results['insert_docs_per_s']:.0f} docs/s, "
        f"index complete {results['settle_s']:.1f} s after the last upsert"
    )
    print(f"  {'mode':<12} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10} {'CPU ms/search':>14}")
    for name, value in results.items():
        if isinstance(value, dict):
            print(
                f"  {name:<12} {value['p50_ms']:8.2f} {value['p95_ms']:8.2f} "
                f"{value['recall']:10.3f} {value['cpu_ms']:14.2f}"
            )


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries-count", type=int, default=300, help="searches per mode")
    parser.add_argument("--vectors", help=".npy (n x dim) of real document vectors")
    parser.add_argument("--queries", help=".npy (q x dim) of real query vectors")
    parser.add_argument("--texts", help="document texts, one per line, aligned with --vectors")
    parser.add_argument("--query-texts", help="query texts, one per line, aligned with --queries")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--backends", default="local,pgvector")
    parser.add_argument("--dsn", default="", help="an existing PostgreSQL; default: start one")
    args = parser.parse_args(argv)
    if args.queries is not None and args.queries.isdigit():
        parser.error("--queries is now a .npy of query vectors; the count is --queries-count")
    corpus = load_corpus(args)
    (n, dim), q = corpus.vectors.shape, len(corpus.queries)
    print(f"{n} documents x {dim} dimensions, {q} searches per mode, top 10")
    for backend in args.backends.split(","):
        if backend == "pgvector" and not args.dsn:
            with PostgresServer(settings=()) as pg:  # durable settings, as in production
                report(backend, await run_backend(backend, corpus, args, pg.dsn, pg))
        else:
            report(backend, await run_backend(backend, corpus, args, args.dsn, None))


if __name__ == "__main__":
    asyncio.run(main())
