"""The gateway's own Python per chat request: everything but gRPC and the HTTP server.

Builds the real gateway (``gateway.service.build``: its ASGI app, pipeline, caches, metrics,
breakers) and replaces each typed client's gRPC stub by one that answers at once with what the
trivial services of ``bench/trivial.py`` answer; then sends ``POST /v1/chat/completions``
straight into the ASGI app, ``--concurrency`` at a time, each with a different question, and
prints the CPU per request (min and median of ``--runs``).

    python bench/gateway_python.py [--requests 10000] [--concurrency 64] [--runs 7]

CPU time on a shared machine drifts by tens of percent; for a figure that does not, count
instructions: ``valgrind --tool=callgrind --callgrind-out-file=/dev/null python
bench/gateway_python.py --requests N --runs 1 --warmup 4`` for two values of N, and divide the
difference of the ``Collected`` counts by the difference of the N.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

import numpy as np  # noqa: E402

from gateway.service import build  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from opea_grpc.config import ServerConfig  # noqa: E402
from opea_grpc.pb.v1 import (  # noqa: E402
    chat_pb2,
    common_pb2,
    embedding_pb2,
    rerank_pb2,
    retrieval_pb2,
)
from services.embedding.servicer import packed  # noqa: E402

#: The trivial services' fixed answers (bench/ is a folder of scripts, not a package to type).
trivial: Any = importlib.import_module("bench.trivial")


def replies() -> dict[str, Any]:
    """What each trivial service answers, by stub method name."""
    vector = np.ones((1, trivial.DIMENSIONS), dtype=np.float32) / trivial.DIMENSIONS**0.5
    embedded = embedding_pb2.EmbedResponse.FromString(packed(vector))
    embedded.model = trivial.EMBEDDING_MODEL
    found = []
    for hit in trivial.HITS:
        scored = common_pb2.ScoredDocument(score=hit.score)
        scored.document.id, scored.document.text = hit.id, hit.text
        scored.document.metadata.update(hit.metadata)
        found.append(scored)
    top = found[0].document
    usage = common_pb2.Usage(prompt_tokens=20, completion_tokens=32, total_tokens=52)
    answer = chat_pb2.ChatMessage(role=chat_pb2.ROLE_ASSISTANT, content=trivial.ANSWER)
    chat = common_pb2.Model(id=trivial.CHAT_MODEL, kind=common_pb2.MODEL_KIND_CHAT)
    return {
        "Embed": embedded,
        "Search": retrieval_pb2.SearchResponse(documents=found),
        "Rerank": rerank_pb2.RerankResponse(
            results=[rerank_pb2.RerankResult(index=0, relevance_score=1.0, document=top)],
            model=trivial.RERANK_MODEL,
        ),
        "Chat": chat_pb2.ChatResponse(
            message=answer,
            model=trivial.CHAT_MODEL,
            finish_reason=chat_pb2.FINISH_REASON_STOP,
            usage=usage,
        ),
        "ListModels": common_pb2.ListModelsResponse(models=[chat]),
    }


class Stub:
    """A stub whose every method answers its fixed reply after one trip through the loop (one
    vector per text, one result per search of a batch)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self._answers = answers

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        answers = self._answers

        async def call(request: Any, *, timeout: float, metadata: object = None) -> Any:
            await asyncio.sleep(0)
            if method == "SearchBatch":
                found = retrieval_pb2.SearchBatchResult(response=answers["Search"])
                return retrieval_pb2.SearchBatchResponse(results=[found] * len(request.requests))
            if method == "RerankBatch":
                ranked = rerank_pb2.RerankBatchResult(response=answers["Rerank"])
                return rerank_pb2.RerankBatchResponse(results=[ranked] * len(request.requests))
            if method == "Embed" and len(request.input) > 1:
                reply = embedding_pb2.EmbedResponse(model=answers["Embed"].model)
                vector = answers["Embed"].data[0].embedding
                for i in range(len(request.input)):
                    reply.data.add(index=i).embedding.extend(vector)
                return reply
            return answers[method]

        return call


async def main(args: argparse.Namespace) -> None:
    service = build(ServerConfig(host="127.0.0.1", port=0), Settings())
    gateway = service.gateway
    stub = Stub(replies())
    clients = gateway.mesh.clients
    for client in (clients.embedding, clients.retrieval, clients.rerank, clients.chat):
        if client is not None:
            client._stub = stub  # the only substitution: no gRPC call leaves the process
    for downstream in gateway.mesh.downstreams:
        downstream.models._stub = stub
    app = service.rest.app
    count = 0

    async def one() -> None:
        nonlocal count
        count += 1
        body = (
            b'{"model": "%s", "messages": [{"role": "user", "content": "What does the gateway'
            b' do? (%d)"}]}' % (trivial.CHAT_MODEL.encode(), count)
        )
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body))],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8888),
        }  # fmt: skip
        messages: list[dict[str, Any]] = [{"type": "http.request", "body": body}]
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays: nothing more arrives
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0]["status"] != 200:
            raise SystemExit(f"the gateway answered {sent[0]['status']}: {sent[1]['body']!r}")

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    per = max(1, args.requests // args.concurrency)
    await asyncio.gather(*(worker(args.warmup) for _ in range(args.concurrency)))
    gc.collect()
    gc.freeze()  # as opea-grpc serve does once it has started
    gc.set_threshold(10_000, 20, 50)
    runs = []
    for _ in range(args.runs):
        began = time.process_time()
        await asyncio.gather(*(worker(per) for _ in range(args.concurrency)))
        runs.append((time.process_time() - began) / (per * args.concurrency) * 1e6)
    print(
        f"gateway Python per request: min {min(runs):.1f} us, median "
        f"{statistics.median(runs):.1f} us ({args.runs} runs of {per * args.concurrency})"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=50, help="requests per caller first")
    return parser.parse_args()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main(parse_args()))
    else:
        uvloop.run(main(parse_args()))
