"""Retrieval quality through the running services: embedding -> retrieval -> rerank on BEIR data.

    python bench/beir.py ../shared/data/scifact [--split train] [--rerank-depth 10,20,100]

Reads a BEIR-format directory (corpus.jsonl[.gz], queries.jsonl, qrels/SPLIT.tsv), ingests the
corpus through the embedding and retrieval services (Embed, then Upsert), then for each judged
query embeds it, searches (dense only, and hybrid with the query text), reranks the best 10
and 100 candidates of each, and prints nDCG@10 and recall@100 for every stage. By default it
starts the three services in this process with their embedded defaults on loopback ports;
``--embedding``, ``--retrieval`` and ``--rerank`` point it at running ones instead.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from opea_grpc.channel import Channels  # noqa: E402
from opea_grpc.client import EmbeddingClient, RerankClient, RetrievalClient  # noqa: E402
from opea_grpc.config import ServerConfig  # noqa: E402
from opea_grpc.pb.v1 import (  # noqa: E402
    common_pb2,
    embedding_pb2,
    rerank_pb2,
    retrieval_pb2,
)

Qrels = dict[str, dict[str, int]]


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def find(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise SystemExit(f"{directory} has no {name}[.gz]: is it a BEIR-format directory?")


def read_qrels(path: Path) -> Qrels:
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as rows:
        for row in csv.DictReader(rows, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def ndcg_at(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    dcg = sum(
        (2 ** relevant.get(doc, 0) - 1) / math.log2(i + 2) for i, doc in enumerate(ranked[:k])
    )
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum((2**rel - 1) / math.log2(i + 2) for i, rel in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    hits = {doc for doc in ranked[:k] if relevant.get(doc, 0) > 0}
    wanted = {doc for doc, rel in relevant.items() if rel > 0}
    return len(hits) / len(wanted) if wanted else 0.0


@asynccontextmanager
async def embedded_services(data_dir: Path) -> AsyncIterator[tuple[str, str, str]]:
    """Start embedding, retrieval and rerank with their embedded defaults on loopback."""
    import services.embedding.service as embedding
    import services.rerank.service as rerank
    import services.retrieval.service as retrieval

    loopback = ServerConfig(host="127.0.0.1", port=0)
    built = [
        embedding.build(loopback, embedding.Settings()),
        retrieval.build(loopback, retrieval.Settings(data_dir=str(data_dir))),
        rerank.build(loopback, rerank.Settings()),
    ]
    async with AsyncExitStack() as stack:
        for service in built:
            await stack.enter_async_context(service)
        yield built[0].target, built[1].target, built[2].target


async def ingest(
    corpus: list[dict[str, Any]],
    embedder: EmbeddingClient,
    index: RetrievalClient,
    collection: str,
    batch: int,
) -> None:
    started, done = time.perf_counter(), 0
    for start in range(0, len(corpus), batch):
        rows = corpus[start : start + batch]
        texts = [f"{r.get('title', '')}\n{r['text']}".strip() for r in rows]
        reply = await embedder.embed(embedding_pb2.EmbedRequest(input=texts), timeout=600)
        documents = [
            common_pb2.Document(id=str(r["_id"]), text=text, embedding=e.embedding)
            for r, text, e in zip(rows, texts, reply.data, strict=True)
        ]
        await index.upsert(
            retrieval_pb2.UpsertRequest(collection=collection, documents=documents), timeout=600
        )
        done += len(rows)
        rate = done / (time.perf_counter() - started)
        print(f"\ringested {done}/{len(corpus)} ({rate:.0f} docs/s)", end="", file=sys.stderr)
    print(file=sys.stderr)


async def evaluate(args: argparse.Namespace) -> None:
    data = Path(args.data)
    qrels = read_qrels(data / "qrels" / f"{args.split}.tsv")
    queries = {str(q["_id"]): q["text"] for q in read_jsonl(find(data, "queries.jsonl"))}
    judged = [(qid, queries[qid]) for qid in qrels if qid in queries][: args.limit or None]
    corpus = list(read_jsonl(find(data, "corpus.jsonl")))
    print(f"{data.name}: {len(corpus)} documents, {len(judged)} judged {args.split} queries")

    async with AsyncExitStack() as stack:
        if args.embedding and args.retrieval and args.rerank:
            targets = (args.embedding, args.retrieval, args.rerank)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="beir-"))
            targets = await stack.enter_async_context(embedded_services(Path(tmp)))
        channels = Channels()
        stack.push_async_callback(channels.close)
        embedder = EmbeddingClient(channels.get(targets[0], [EmbeddingClient.SERVICE]))
        index = RetrievalClient(channels.get(targets[1], [RetrievalClient.SERVICE]))
        reranker = RerankClient(channels.get(targets[2], [RerankClient.SERVICE]))

        await ingest(corpus, embedder, index, args.collection, args.batch)
        depths = sorted({int(d) for d in args.rerank_depth.split(",")})
        labels = {"dense": "dense (MiniLM)"}
        labels |= {f"dense+{d}": f"dense + rerank top {d}" for d in depths}
        labels["hybrid"] = "hybrid (dense + BM25)"
        labels |= {f"hybrid+{d}": f"hybrid + rerank top {d}" for d in depths}
        scores: dict[str, list[tuple[float, float]]] = {name: [] for name in labels}
        limit = asyncio.Semaphore(args.concurrency)

        async def reranked(text: str, ranked: list[common_pb2.Document], depth: int) -> list[str]:
            reply = await reranker.rerank(
                rerank_pb2.RerankRequest(query=text, documents=ranked[:depth])
            )
            return [r.document.id for r in reply.results] + [d.id for d in ranked[depth:]]

        async def one(qid: str, text: str) -> None:
            async with limit:
                vector = (await embedder.embed(embedding_pb2.EmbedRequest(input=[text]))).data[0]
                dense = await index.search(
                    retrieval_pb2.SearchRequest(
                        collection=args.collection, vector=vector.embedding, top_k=100
                    )
                )
                hybrid = await index.search(
                    retrieval_pb2.SearchRequest(
                        collection=args.collection, vector=vector.embedding, query=text, top_k=100
                    )
                )
                runs: dict[str, list[str]] = {}
                for name, found in (("dense", dense), ("hybrid", hybrid)):
                    docs = [d.document for d in found.documents]
                    runs[name] = [d.id for d in docs]
                    for d in depths:
                        runs[f"{name}+{d}"] = await reranked(text, docs, d)
            relevant = qrels[qid]
            for name, ranked in runs.items():
                scores[name].append(
                    (ndcg_at(ranked, relevant, 10), recall_at(ranked, relevant, 100))
                )

        started = time.perf_counter()
        await asyncio.gather(*(one(qid, text) for qid, text in judged))
        elapsed = time.perf_counter() - started

    print(f"{len(judged)} queries in {elapsed:.1f} s ({len(judged) / elapsed:.1f} queries/s)")
    print(f"{'stage':<30}{'nDCG@10':>10}{'recall@100':>12}")
    for name, values in scores.items():
        ndcg = sum(v[0] for v in values) / len(values)
        recall = sum(v[1] for v in values) / len(values)
        print(f"{labels[name]:<30}{ndcg:>10.4f}{recall:>12.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="BEIR-format directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--collection", default="beir")
    parser.add_argument(
        "--rerank-depth", default="10,20,100", help="candidates sent to rerank (comma-separated)"
    )
    parser.add_argument("--batch", type=int, default=64, help="documents per ingest call")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N queries")
    parser.add_argument("--embedding", help="target of a running embedding service")
    parser.add_argument("--retrieval", help="target of a running retrieval service")
    parser.add_argument("--rerank", help="target of a running rerank service")
    asyncio.run(evaluate(parser.parse_args()))


if __name__ == "__main__":
    main()
