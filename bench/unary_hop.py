"""One unary hop: MicroService (health, reflection, interceptor) against a bare grpc.aio server.

Each server runs in its own process with the same trivial RerankService servicer; a client
process drives it at a fixed concurrency. Reported per server: calls/s, client-side latency
percentiles, and server CPU (user + system) per call, measured from the server process alone.

    python bench/unary_hop.py [--calls 20000] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from opea_grpc import Context  # noqa: E402
from opea_grpc.config import ServerConfig  # noqa: E402
from opea_grpc.pb.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc  # noqa: E402
from opea_grpc.server import MicroService  # noqa: E402

RESPONSE = rerank_pb2.RerankResponse(
    model="bench", results=[rerank_pb2.RerankResult(index=0, relevance_score=1.0)]
)


class Trivial(rerank_pb2_grpc.RerankServiceServicer):
    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: Context
    ) -> rerank_pb2.RerankResponse:
        return RESPONSE


async def serve(kind: str) -> None:
    if kind == "bare":
        server = grpc.aio.server()
        rerank_pb2_grpc.add_RerankServiceServicer_to_server(Trivial(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()
    else:
        service = MicroService("bench", config=ServerConfig(host="127.0.0.1", port=0))
        service.add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, Trivial())
        print(await service.start(), flush=True)
        await service.wait_for_termination()


async def drive(port: int, calls: int, concurrency: int) -> list[float]:
    request = rerank_pb2.RerankRequest(
        query="q", documents=[common_pb2.Document(id="1", text="one")]
    )
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                await stub.Rerank(request, timeout=10)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def measure(kind: str, calls: int, concurrency: int, warmup: int) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        server = psutil.Process(proc.pid)
        asyncio.run(drive(port, warmup, concurrency))
        cpu0 = server.cpu_times()
        wall0 = time.perf_counter()
        latencies = asyncio.run(drive(port, calls, concurrency))
        wall = time.perf_counter() - wall0
        cpu1 = server.cpu_times()
    finally:
        proc.terminate()
        proc.wait()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    q = statistics.quantiles(latencies, n=100)
    return {
        "rps": calls / wall,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "cpu_us": cpu / calls * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=("bare", "microservice"), help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    results: dict[str, list[dict[str, float]]] = {"bare": [], "microservice": []}
    for _ in range(args.rounds):
        for kind in results:  # interleaved, so drift in the machine hits both alike
            results[kind].append(measure(kind, args.calls, args.concurrency, args.calls // 10))
    print(f"unary hop, {args.calls} calls x {args.rounds} rounds, concurrency {args.concurrency}")
    print(f"{'server':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/call':>14}")
    medians = {}
    for kind, runs in results.items():
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        medians[kind] = row
        print(
            f"{kind:<14}{row['rps']:>10.0f}{row['p50_ms']:>10.2f}"
            f"{row['p99_ms']:>10.2f}{row['cpu_us']:>14.1f}"
        )
    overhead = medians["microservice"]["cpu_us"] / medians["bare"]["cpu_us"] - 1
    print(f"MicroService CPU per call vs bare grpc.aio: {overhead:+.1%} (median of rounds)")


if __name__ == "__main__":
    main()
