"""Embedding service throughput: sentences/s over gRPC, batched and one text per call.

Starts the service in this process on 127.0.0.1:0 with the chosen backend and drives it through
the typed client. Four scenarios: short (~10 words) and passage (~150 words) inputs, each

    batch    requests of 64 texts, one after another
    single   requests of 1 text, from 16 concurrent callers (micro-batching coalesces them)

Reported: sentences/s, the forward passes the backend ran, and the mean texts per pass.

    python bench/embedding.py [--backend minilm|hashing] [--short 640] [--passages 192]
                              [--max-batch 32]

OpenBLAS starts one thread per core; run with OPENBLAS_NUM_THREADS=1 to compare (see
services/embedding/minilm.py on threads).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from opea_grpc.channel import connect  # noqa: E402
from opea_grpc.client import EmbeddingClient  # noqa: E402
from opea_grpc.pb.v1 import embedding_pb2, embedding_pb2_grpc  # noqa: E402
from opea_grpc.testing import serve  # noqa: E402
from services.embedding.hashing import HashingEmbedder  # noqa: E402
from services.embedding.minilm import MiniLMEmbedder  # noqa: E402
from services.embedding.service import Settings  # noqa: E402
from services.embedding.servicer import EmbeddingServicer  # noqa: E402

PASSAGE = (
    "Retrieval-augmented generation answers a question in several steps. The question is "
    "first turned into a vector by an embedding model, and the passages whose vectors lie "
    "closest to it are fetched from an index that was built when the documents were ingested. "
    "A reranker may then reorder those candidates by reading each of them together with the "
    "question, which is slower than comparing vectors but more accurate, so it runs only on a "
    "short list. The best passages are placed into the prompt of a language model, which "
    "writes the answer and can cite where each part of it came from. Every step runs as its "
    "own service, so that each can be scaled, replaced or tested on its own, and the gateway "
    "in front of them speaks the protocol that the clients already know, while the services "
    "talk to each other over typed contracts with deadlines."
)


def short_text(i: int) -> str:
    return f"request {i}: how do I reset the password of my account?"


def passage_text(i: int) -> str:
    return f"Passage {i}. {PASSAGE}"


@dataclass(frozen=True)
class Result:
    texts: int
    seconds: float
    passes: int

    @property
    def rate(self) -> float:
        return self.texts / self.seconds


async def drive(
    client: EmbeddingClient,
    backend: MiniLMEmbedder | HashingEmbedder,
    make: Callable[[int], str],
    *,
    texts: int,
    per_request: int,
    callers: int,
) -> Result:
    requests = [
        embedding_pb2.EmbedRequest(input=[make(i * per_request + j) for j in range(per_request)])
        for i in range(texts // per_request)
    ]
    queue = iter(requests)

    async def caller() -> None:
        for req in queue:
            reply = await client.embed(req, timeout=600)
            assert len(reply.data) == len(req.input)

    before = backend.passes
    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    seconds = time.perf_counter() - start
    return Result(len(requests) * per_request, seconds, backend.passes - before)


async def main(args: argparse.Namespace) -> None:
    backend: MiniLMEmbedder | HashingEmbedder = (
        MiniLMEmbedder(max_batch=args.max_batch)
        if args.backend == "minilm"
        else HashingEmbedder(max_batch=args.max_batch)
    )
    await backend.start()
    servicer = EmbeddingServicer(backend, max_inputs=2048, max_input_chars=100_000)
    add = embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    print(
        f"backend {args.backend}, max_batch {args.max_batch}, {os.cpu_count()} CPUs, "
        f"OPENBLAS_NUM_THREADS={blas}"
    )
    try:
        async with serve((add, servicer, backend.ready)) as served:
            channel = connect(served.target, [EmbeddingClient.SERVICE])
            client = EmbeddingClient(channel)
            await client.embed(embedding_pb2.EmbedRequest(input=[PASSAGE] * 8))  # warm up
            lengths: list[tuple[str, Callable[[int], str], int]] = [
                ("short", short_text, args.short),
                ("passage", passage_text, args.passages),
            ]
            shapes = [("batch of 64", 64, 1), ("single x16 callers", 1, 16)]
            scenarios = itertools.product(lengths, shapes)
            for (length, make, count), (shape, per_request, callers) in scenarios:
                result = await drive(
                    client, backend, make, texts=count, per_request=per_request, callers=callers
                )
                per_pass = result.texts / max(result.passes, 1)
                print(
                    f"{length:8s} {shape:19s} {result.rate:8.1f} sentences/s  "
                    f"({result.texts} texts in {result.seconds:6.2f} s, {result.passes} passes, "
                    f"{per_pass:.1f} texts/pass)"
                )
            await channel.close(None)
    finally:
        await backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("minilm", "hashing"), default="minilm")
    parser.add_argument("--short", type=int, default=640, help="short texts per scenario")
    parser.add_argument("--passages", type=int, default=192, help="passages per scenario")
    parser.add_argument(
        "--max-batch", type=int, default=Settings().max_batch, help="texts per forward pass"
    )
    asyncio.run(main(parser.parse_args()))
