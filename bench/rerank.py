"""Rerank latency: the lexical backend (BM25 + rank fusion) served by ``python -m services.rerank``.

One client calls the service sequentially (concurrency 1) with a query and ``--candidates``
passages of ``--words`` words each, the shape a RAG pipeline sends after first-stage retrieval.
Reported: client-side p50/p99 through gRPC, the server process's CPU per call, and the time the
ranking itself takes in-process (no gRPC), so the difference is the transport's share.

    python bench/rerank.py [--calls 500] [--candidates 20] [--words 120]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from opea_grpc.channel import connect  # noqa: E402
from opea_grpc.client import RerankClient  # noqa: E402
from opea_grpc.pb.v1 import common_pb2, rerank_pb2  # noqa: E402
from services.rerank.lexical import LexicalReranker  # noqa: E402

_COMMON = (
    "the of and to in is was for on that with as by at from it be this are an which or were "
    "has have not but its their also can more these other been into than when all after some"
)
COMMON = _COMMON.split()
_TOPICS = (
    "river mountain harbour railway bridge cathedral market festival museum library garden "
    "engine turbine voltage circuit protocol kernel compiler database index query vector "
    "protein enzyme membrane neuron climate glacier volcano forest desert ocean reef island "
    "treaty empire parliament election currency tariff harvest famine plague vaccine"
)
TOPICS = _TOPICS.split()


def passage(rng: random.Random, words: int) -> str:
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(TOPICS) if rng.random() < 0.35 else rng.choice(COMMON))
        if len(sentence) >= rng.randint(10, 20):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def make_request(candidates: int, words: int, seed: int = 7) -> rerank_pb2.RerankRequest:
    rng = random.Random(seed)
    docs = [common_pb2.Document(id=str(i), text=passage(rng, words)) for i in range(candidates)]
    query = "how does the glacier feed the river near the harbour railway bridge"
    return rerank_pb2.RerankRequest(query=query, documents=docs, top_n=5)


async def drive(target: str, req: rerank_pb2.RerankRequest, calls: int) -> list[float]:
    channel = connect(target, [RerankClient.SERVICE])
    client = RerankClient(channel, timeout=10)
    try:
        for _ in range(max(50, calls // 10)):  # warm-up: connection, caches
            await client.rerank(req)
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            await client.rerank(req)
            latencies.append(time.perf_counter() - start)
        return latencies
    finally:
        await channel.close(None)


async def measure(req: rerank_pb2.RerankRequest, calls: int) -> tuple[list[float], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPEA_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.rerank", "--port", "0", "--host", "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        target = line.rsplit(" ", 1)[1].strip()
        server = psutil.Process(proc.pid)
        await drive(target, req, 0)
        cpu0 = server.cpu_times()
        latencies = await drive(target, req, calls)
        cpu1 = server.cpu_times()
    finally:
        proc.terminate()
        await proc.wait()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return latencies, cpu / (calls + max(50, calls // 10))


def ranking_only(req: rerank_pb2.RerankRequest, calls: int) -> list[float]:
    reranker = LexicalReranker()
    texts = [d.text for d in req.documents]
    for _ in range(50):
        reranker.rank(req.query, texts, req.top_n)
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        reranker.rank(req.query, texts, req.top_n)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--words", type=int, default=120, help="words per passage")
    args = parser.parse_args()
    req = make_request(args.candidates, args.words)
    chars = sum(len(d.text) for d in req.documents)
    latencies, cpu = asyncio.run(measure(req, args.calls))
    local = ranking_only(req, args.calls)
    q = statistics.quantiles(latencies, n=100)
    lq = statistics.quantiles(local, n=100)
    print(
        f"rerank lexical (bm25-rrf): {args.candidates} candidates x {args.words} words "
        f"({chars} chars), top_n 5, {args.calls} sequential calls"
    )
    print(f"through gRPC    p50 {q[49] * 1000:6.2f} ms   p99 {q[98] * 1000:6.2f} ms")
    print(f"server CPU      {cpu * 1000:6.2f} ms per call")
    print(f"ranking only    p50 {lq[49] * 1000:6.2f} ms   p99 {lq[98] * 1000:6.2f} ms (in-process)")


if __name__ == "__main__":
    main()
