"""The local retrieval index at scale, through the gRPC service: exact against HNSW.

The service runs as its own process (``python -m services.retrieval --backend local``) on a
temporary data directory; this process ingests the vectors over gRPC, then measures, each on a
freshly started service:

1. exact search (``ann_threshold`` above the size): start-up time (load from SQLite), p50/p95
   latency of dense, filtered (half the documents) and hybrid (dense + BM25) searches;
2. HNSW with no graph on disk: start-up time, and the time until the graph is built in the
   background (searches are exact until then); the same latencies; recall@10 against (1);
3. HNSW again, its graph saved by the previous stop: start-up time and time to restore it.

Latency is client-side (one call at a time, so queueing plays no part); server CPU per search is
the service process's own user+system time. Vectors are a synthetic clustered set unless
``--vectors`` gives a ``.npy`` of real ones (e.g. MiniLM embeddings of a corpus); queries are
``--queries`` or, by default, held-out rows of the vectors file (never ingested).

    python bench/retrieval.py [-n 100000] [--dim 384] [--queries-count 200]
    python bench/retrieval.py --vectors corpus.npy --queries queries.npy [--texts corpus.txt]
    python bench/retrieval.py --embed 127.0.0.1:50051 --texts corpus.txt [--query-texts q.txt]

``--embed`` first turns the texts (one per line) into vectors through a running
``opea.v1.EmbeddingService`` (e.g. ``python -m services.embedding``, MiniLM) and saves them as
``vectors.npy`` / ``queries.npy`` in the work directory, for ``--vectors`` next time; without
``--query-texts`` the last ``--queries-count`` lines are the queries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from opea_grpc.channel import connect  # noqa: E402
from opea_grpc.client import EmbeddingClient, RetrievalClient  # noqa: E402
from opea_grpc.config import ClientConfig  # noqa: E402
from opea_grpc.pb.v1 import common_pb2, embedding_pb2, retrieval_pb2  # noqa: E402

LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
GRAPH_READY = re.compile(r"HNSW graph built|graph restored")
COLLECTION = "bench"
EXACT = str(10**12)  # an ann_threshold no collection reaches


@dataclass
class Service:
    process: asyncio.subprocess.Process
    target: str
    spawned: float
    listening: float
    graph_ready: asyncio.Event = field(default_factory=asyncio.Event)
    graph_at: float = 0.0


async def start(data_dir: Path, ann_threshold: str, log: Path) -> Service:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPEA_RETRIEVAL_DATA_DIR": str(data_dir),
        "OPEA_RETRIEVAL_ANN_THRESHOLD": ann_threshold,
        "OPEA_RETRIEVAL_MAX_BATCH": "4096",
        "OPEA_MAX_MESSAGE_BYTES": str(64 * 1024 * 1024),
    }
    spawned = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.retrieval", "--port", "0", "--backend", "local",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), 600)).decode()
        if not line:
            raise RuntimeError(f"the service exited before listening; see {log}")
        if found := LISTENING.search(line):
            break
    service = Service(process, f"{found[1]}:{found[2]}", spawned, time.perf_counter())
    asyncio.get_running_loop().create_task(_follow(service, process.stderr, log))
    return service


async def _follow(service: Service, stream: asyncio.StreamReader, log: Path) -> None:
    with log.open("a") as out:
        async for raw in stream:
            line = raw.decode()
            out.write(line)
            if GRAPH_READY.search(line) and not service.graph_ready.is_set():
                service.graph_at = time.perf_counter()
                service.graph_ready.set()


async def stop(service: Service) -> None:
    service.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(service.process.wait(), 600)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around ``n // 100`` centres, a stand-in for sentence embeddings."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((max(1, n // 100), dim))
    points = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim))
    unit: np.ndarray = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    return unit


VOCABULARY = np.array([f"w{i}" for i in range(20000)])


def synthetic_texts(n: int, words: int, seed: int) -> list[str]:
    """Documents: words drawn with Zipf frequencies, as in natural text."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.2, size=(n, words)), len(VOCABULARY)) - 1
    return [" ".join(row) for row in VOCABULARY[ranks]]


def synthetic_queries(n: int, words: int, seed: int) -> list[str]:
    """Queries: content words (frequency ranks 50-5000), as a user would type them."""
    rng = np.random.default_rng(seed)
    return [" ".join(row) for row in VOCABULARY[rng.integers(50, 5000, size=(n, words))]]


async def embed(target: str, texts: Sequence[str], batch: int = 64) -> np.ndarray:
    """Vectors of ``texts`` from the EmbeddingService at ``target``."""
    channel = connect(target, [EmbeddingClient.SERVICE])
    client = EmbeddingClient(channel, timeout=600)
    out: list[list[float]] = []
    try:
        for start_ in range(0, len(texts), batch):
            reply = await client.embed(
                embedding_pb2.EmbedRequest(input=texts[start_ : start_ + batch])
            )
            out.extend(list(e.embedding) for e in sorted(reply.data, key=lambda e: e.index))
            print(f"\rembedded {len(out)}/{len(texts)}", end="", flush=True)
    finally:
        await channel.close(None)
    print()
    return np.asarray(out, dtype=np.float32)


def lines(path: str, count: int | None = None) -> list[str]:
    with open(path, encoding="utf-8") as f:
        found = f.read().splitlines()[:count]
    if count is not None and len(found) < count:
        raise SystemExit(f"{path}: {len(found)} lines, need {count} (one per vector)")
    return found


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass
class Timing:
    latencies: list[float]
    cpu_per_call: float
    results: list[list[str]]

    def line(self, label: str) -> str:
        p50, p95 = percentile(self.latencies, 50) * 1e3, percentile(self.latencies, 95) * 1e3
        return (
            f"  {label:<22} p50 {p50:7.2f} ms   p95 {p95:7.2f} ms   "
            f"server CPU {self.cpu_per_call * 1e3:6.2f} ms/search"
        )


async def measure(
    service: Service, client: RetrievalClient, requests: Sequence[retrieval_pb2.SearchRequest]
) -> Timing:
    for request in requests[:10]:  # warm up
        await client.search(request, timeout=60)
    proc = psutil.Process(service.process.pid)
    cpu0 = sum(proc.cpu_times()[:2])
    latencies, results = [], []
    for request in requests:
        t = time.perf_counter()
        reply = await client.search(request, timeout=60)
        latencies.append(time.perf_counter() - t)
        results.append([d.document.id for d in reply.documents])
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    return Timing(latencies, cpu / len(requests), results)


def recall(approx: Sequence[list[str]], exact: Sequence[list[str]]) -> float:
    return statistics.fmean(
        len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(approx, exact, strict=True)
    )


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    query_texts: list[str] | None = None
    if args.embed:
        if not args.texts:
            raise SystemExit("--embed needs --texts (one document per line)")
        corpus = lines(args.texts)
        if args.query_texts:
            query_texts = lines(args.query_texts, args.queries_count)
        else:
            corpus, query_texts = corpus[: -args.queries_count], corpus[-args.queries_count :]
        corpus = corpus[: args.n]
        vectors, queries = await embed(args.embed, corpus), await embed(args.embed, query_texts)
        np.save(workdir / "vectors.npy", vectors)
        np.save(workdir / "queries.npy", queries)
        (workdir / "texts.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
        (workdir / "query-texts.txt").write_text("\n".join(query_texts) + "\n", encoding="utf-8")
        print(f"vectors saved in {workdir}: rerun with --vectors/--queries/--texts/--query-texts")
        texts = corpus
    elif args.vectors:
        vectors = np.load(args.vectors).astype(np.float32)
        if args.queries:
            queries = np.load(args.queries).astype(np.float32)[: args.queries_count]
        else:
            queries, vectors = vectors[-args.queries_count :], vectors[: -args.queries_count]
        vectors = vectors[: args.n]
    else:
        vectors = clustered(args.n, args.dim, seed=1)
        queries = clustered(args.queries_count, args.dim, seed=2)
    n, dim = vectors.shape
    if not args.embed:
        texts = lines(args.texts, n) if args.texts else synthetic_texts(n, 30, seed=3)
    if query_texts is None:
        if args.query_texts:
            query_texts = lines(args.query_texts, len(queries))
        else:
            query_texts = synthetic_queries(len(queries), 3, seed=4)
    print(f"{n} vectors x {dim}, {len(queries)} queries, top_k {args.top_k}", flush=True)

    half = common_pb2.Filter(
        conditions=[common_pb2.Condition(key="half", operator=common_pb2.OPERATOR_EQ)]
    )
    half.conditions[0].value.number_value = 1
    k = args.top_k
    dense = [
        retrieval_pb2.SearchRequest(collection=COLLECTION, vector=q.tolist(), top_k=k)
        for q in queries
    ]
    filtered = [
        retrieval_pb2.SearchRequest(collection=COLLECTION, vector=q.tolist(), top_k=k, filter=half)
        for q in queries
    ]
    hybrid = [
        retrieval_pb2.SearchRequest(collection=COLLECTION, vector=q.tolist(), query=t, top_k=k)
        for q, t in zip(queries, query_texts, strict=True)
    ]

    data_dir, log = workdir / "index", workdir / "service.log"
    print(f"data in {data_dir}, service log in {log}", flush=True)
    figures: dict[str, object] = {"n": n, "dim": dim, "queries": len(queries), "top_k": k}
    config = ClientConfig(max_attempts=1, max_message_bytes=64 * 1024 * 1024)

    async def phase(threshold: str, body: Callable[[Service, RetrievalClient], object]) -> Service:
        service = await start(data_dir, threshold, log)
        channel = connect(service.target, [RetrievalClient.SERVICE], config)
        try:
            result = body(service, RetrievalClient(channel, timeout=600))
            if asyncio.iscoroutine(result):
                await result
        finally:
            await channel.close(None)
            await stop(service)
        return service

    async def ingest(service: Service, client: RetrievalClient) -> None:
        t = time.perf_counter()
        for start_ in range(0, n, args.batch):
            docs = [
                common_pb2.Document(id=f"d{i}", text=texts[i], embedding=vectors[i].tolist())
                for i in range(start_, min(n, start_ + args.batch))
            ]
            for i, d in enumerate(docs):
                d.metadata.update({"half": (start_ + i) % 2})
            await client.upsert(
                retrieval_pb2.UpsertRequest(collection=COLLECTION, documents=docs), timeout=600
            )
        seconds = time.perf_counter() - t
        figures["ingest_s"] = seconds
        print(f"ingest: {seconds:.1f} s ({n / seconds:.0f} documents/s, batches of {args.batch})")

    exact: dict[str, Timing] = {}
    approx: dict[str, Timing] = {}

    async def searches(into: dict[str, Timing], service: Service, client: RetrievalClient) -> None:
        rss = psutil.Process(service.process.pid).memory_info().rss / 2**20
        print(f"  start-up (spawn to listening): {service.listening - service.spawned:.2f} s, "
              f"RSS {rss:.0f} MiB")  # fmt: skip
        for label, requests in (("dense", dense), ("dense + filter 50%", filtered),
                                ("hybrid (dense + BM25)", hybrid)):  # fmt: skip
            into[label] = await measure(service, client, requests)
            print(into[label].line(label), flush=True)

    await phase(EXACT, ingest)

    print("exact:")
    s = await phase(EXACT, lambda svc, c: searches(exact, svc, c))
    figures["exact_startup_s"] = s.listening - s.spawned

    async def ann(service: Service, client: RetrievalClient) -> None:
        await asyncio.wait_for(service.graph_ready.wait(), 3600)
        print(f"  graph ready {service.graph_at - service.spawned:.1f} s after spawn")
        await searches(approx, service, client)

    print("HNSW, graph built at start:")
    s = await phase(str(args.ann_threshold), ann)
    figures["ann_build_startup_s"] = s.listening - s.spawned
    figures["ann_build_ready_s"] = s.graph_at - s.spawned

    print("HNSW, graph restored from disk:")
    approx_again: dict[str, Timing] = {}

    async def restored(service: Service, client: RetrievalClient) -> None:
        await asyncio.wait_for(service.graph_ready.wait(), 3600)
        print(f"  graph ready {service.graph_at - service.spawned:.1f} s after spawn")
        approx_again["dense"] = await measure(service, client, dense)

    s = await phase(str(args.ann_threshold), restored)
    figures["ann_restore_startup_s"] = s.listening - s.spawned
    figures["ann_restore_ready_s"] = s.graph_at - s.spawned

    print(f"recall@{k} of HNSW against exact:")
    for label in exact:
        r = recall(approx[label].results, exact[label].results)
        figures[f"recall_{label}"] = r
        print(f"  {label:<22} {r:.4f}")
    r = recall(approx_again["dense"].results, exact["dense"].results)
    print(f"  {'dense, restored graph':<22} {r:.4f}")
    for name, timings in (("exact", exact), ("ann", approx)):
        for label, t in timings.items():
            figures[f"{name}_{label}_p50_ms"] = percentile(t.latencies, 50) * 1e3
            figures[f"{name}_{label}_cpu_ms"] = t.cpu_per_call * 1e3
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="documents (default 100000)")
    parser.add_argument("--dim", type=int, default=384, help="synthetic vector size (384)")
    parser.add_argument("--vectors", help=".npy (n x dim) of real document vectors")
    parser.add_argument("--queries", help=".npy of real query vectors (else: held-out rows)")
    parser.add_argument("--texts", help="document texts, one per line, aligned with --vectors")
    parser.add_argument("--query-texts", help="query texts, one per line, aligned with queries")
    parser.add_argument("--embed", metavar="TARGET", help="embed --texts via this EmbeddingService")
    parser.add_argument("--queries-count", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1000, help="documents per Upsert")
    parser.add_argument("--ann-threshold", type=int, default=20_000)
    parser.add_argument("--data-dir", help="work directory (default: a new temporary one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    workdir = Path(args.data_dir or tempfile.mkdtemp(prefix="bench-retrieval-"))
    workdir.mkdir(parents=True, exist_ok=True)
    figures = asyncio.run(run(args, workdir))
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
