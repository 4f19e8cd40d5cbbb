"""One unary hop: MicroService (health, reflection, interceptor) against a bare grpc.aio server,
on gRPC core's default endpoints and on the ones the ``opea-grpc`` command chooses.

Each row runs a server and a client process with the same trivial RerankService servicer; the
client drives the server at a fixed concurrency. Reported per row: calls/s, client-side latency
percentiles, and CPU (user + system) per call of the server process and of the client process.
Rows:

- ``bare, gRPC defaults``: ``grpc.aio.server()`` with ``GRPC_EXPERIMENTS`` empty.
- ``bare``: the same with ``GRPC_EXPERIMENTS`` as :mod:`opea_grpc.entry` sets it.
- ``microservice``: :class:`~opea_grpc.server.MicroService`, as the command runs it.
- ``microservice, unix``: the same, called over its Unix socket (``OPEA_UNIX_SOCKET``), as the
  gateway calls the services under ``opea-grpc up``.

    python bench/unary_hop.py [--calls 20000] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from opea_grpc import entry  # noqa: E402  (imports no grpc: each process settles its own)

T = TypeVar("T")

ROWS = {
    "bare, gRPC defaults": ("bare", ""),
    "bare": ("bare", entry.EXPERIMENTS),
    "microservice": ("microservice", entry.EXPERIMENTS),
    "microservice, unix": ("unix", entry.EXPERIMENTS),
}


async def serve(kind: str) -> None:
    import grpc

    from opea_grpc import Context
    from opea_grpc.batch import RerankBatching
    from opea_grpc.config import ServerConfig
    from opea_grpc.pb.v1 import rerank_pb2, rerank_pb2_grpc
    from opea_grpc.server import MicroService

    response = rerank_pb2.RerankResponse(
        model="bench", results=[rerank_pb2.RerankResult(index=0, relevance_score=1.0)]
    )

    class Trivial(RerankBatching, rerank_pb2_grpc.RerankServiceServicer):
        async def Rerank(
            self, request: rerank_pb2.RerankRequest, context: Context
        ) -> rerank_pb2.RerankResponse:
            return response

    if kind == "bare":
        server = grpc.aio.server()
        rerank_pb2_grpc.add_RerankServiceServicer_to_server(Trivial(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()
    else:  # the client calls the Unix socket when there is one, the port otherwise
        socket = f"/tmp/opea-grpc-hop-{os.getpid()}.sock" if kind == "unix" else ""
        config = ServerConfig(host="127.0.0.1", port=0, unix_socket=socket)
        service = MicroService("bench", config=config)
        service.add_service(rerank_pb2_grpc.add_RerankServiceServicer_to_server, Trivial())
        port = await service.start()
        print(f"unix:{socket}" if socket else f"127.0.0.1:{port}", flush=True)
        try:
            await service.wait_for_termination()
        finally:
            await service.stop(0)


async def drive(target: str, calls: int, concurrency: int) -> list[float]:
    import grpc

    from opea_grpc.pb.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc

    request = rerank_pb2.RerankRequest(
        query="q", documents=[common_pb2.Document(id="1", text="one")]
    )
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
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


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``main`` on uvloop when installed, as the command runs its processes."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # pragma: no cover
    return asyncio.run(main)  # pragma: no cover


def client(target: str, calls: int, concurrency: int, server_pid: int) -> None:
    """The client process: warm up, then drive ``calls`` and print the figures as JSON."""
    import psutil

    server = psutil.Process(server_pid)
    me = psutil.Process()
    run_loop(drive(target, calls // 10, concurrency))
    s0, c0, wall0 = server.cpu_times(), me.cpu_times(), time.perf_counter()
    latencies = run_loop(drive(target, calls, concurrency))
    wall = time.perf_counter() - wall0
    s1, c1 = server.cpu_times(), me.cpu_times()
    q = statistics.quantiles(latencies, n=100)
    figures = {
        "rps": calls / wall,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "server_us": ((s1.user - s0.user) + (s1.system - s0.system)) / calls * 1e6,
        "client_us": ((c1.user - c0.user) + (c1.system - c0.system)) / calls * 1e6,
    }
    print(json.dumps(figures), flush=True)


def measure(row: str, calls: int, concurrency: int) -> dict[str, float]:
    kind, experiments = ROWS[row]
    env = dict(os.environ, GRPC_EXPERIMENTS=experiments, PYTHONPATH=str(ROOT))
    me = [sys.executable, __file__]
    server = subprocess.Popen([*me, "--serve", kind], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None
        target = server.stdout.readline().strip()
        argv = [*me, "--drive", target, str(calls), str(concurrency), str(server.pid)]
        out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    finally:
        server.terminate()
        server.wait()
    if target.startswith("unix:"):  # a terminated server leaves its socket's file
        Path(target.removeprefix("unix:")).unlink(missing_ok=True)
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=("bare", "microservice", "unix"), help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        run_loop(serve(args.serve))
        return
    if args.drive:
        target, calls, concurrency, pid = args.drive
        client(target, int(calls), int(concurrency), int(pid))
        return
    results: dict[str, list[dict[str, float]]] = {row: [] for row in ROWS}
    for _ in range(args.rounds):
        for row in results:  # interleaved, so drift in the machine hits every row alike
            results[row].append(measure(row, args.calls, args.concurrency))
    print(f"unary hop, {args.calls} calls x {args.rounds} rounds, concurrency {args.concurrency}")
    head = ("req/s", "p50 ms", "p99 ms", "server us/call", "client us/call")
    print(f"{'':<22}" + "".join(f"{h:>16}" for h in head))
    medians = {}
    for row, runs in results.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        medians[row] = median
        print(
            f"{row:<22}{median['rps']:>16.0f}{median['p50_ms']:>16.2f}{median['p99_ms']:>16.2f}"
            f"{median['server_us']:>16.1f}{median['client_us']:>16.1f}"
        )
    base, tuned, ms = medians["bare, gRPC defaults"], medians["bare"], medians["microservice"]
    print(
        f"GRPC_EXPERIMENTS={entry.EXPERIMENTS}: server CPU per call "
        f"{tuned['server_us'] / base['server_us'] - 1:+.1%}, client "
        f"{tuned['client_us'] / base['client_us'] - 1:+.1%} against gRPC's defaults"
    )
    print(
        f"MicroService CPU per call against bare grpc.aio: "
        f"{ms['server_us'] / tuned['server_us'] - 1:+.1%} (medians of rounds)"
    )
    unix = medians["microservice, unix"]
    print(
        f"MicroService over its Unix socket against loopback TCP: server CPU per call "
        f"{unix['server_us'] / ms['server_us'] - 1:+.1%}, client "
        f"{unix['client_us'] / ms['client_us'] - 1:+.1%}"
    )


if __name__ == "__main__":
    main()
