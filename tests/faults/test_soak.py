"""Soak: the gateway over the trivial services, every one its own process, under 64 concurrent
clients for a few minutes: no request fails, and no process's memory keeps growing.

``OPEA_TEST_SOAK_SECONDS`` sets the duration (120 by default; longer for a local run). The
resident memory of each process is printed at start, after the warm-up and at the end; the end
may exceed the warm-up by a generous margin only (allocators and caches settle in the warm-up).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from tests.faults.load import QUESTION, ask_streamed, percentile
from tests.faults.processes import STAGES, free_port, rss, serve_argv
from tests.processes import Served, served

SECONDS = float(os.environ.get("OPEA_TEST_SOAK_SECONDS", "120"))
CONCURRENCY = 64
#: Share of the run before the baseline of memory is taken.
WARM_UP = 0.2
#: The most a process may grow after the warm-up: this many bytes, or this share, if more.
GROWTH_BYTES = 48 * 1024 * 1024
GROWTH_SHARE = 0.25
#: Every STREAM_EVERY-th request streams.
STREAM_EVERY = 4

MiB = 1024 * 1024


def memory(processes: dict[str, Served]) -> dict[str, int]:
    return {name: rss(p.pid) for name, p in processes.items()}


@pytest.mark.slow
async def test_soak_at_64_concurrent_clients(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**subprocess_env, "OPEA_GATEWAY_CACHE_SIZE": "0"}  # every request reaches every stage
    async with AsyncExitStack() as stack:
        processes: dict[str, Served] = {}
        children = await asyncio.gather(
            *(
                stack.enter_async_context(
                    served(env, *serve_argv(f"bench.trivial:{s}"), stderr=tmp_path / f"{s}.log")
                )
                for s in STAGES
            )
        )
        processes.update(zip(STAGES, children, strict=True))
        rest = free_port()
        gateway_env = {
            **env,
            **{f"OPEA_GATEWAY_{s.upper()}": p.target for s, p in processes.items()},
            "OPEA_GATEWAY_REST_PORT": str(rest),
        }
        processes["gateway"] = await stack.enter_async_context(
            served(
                gateway_env,
                *serve_argv("gateway"),
                ready=re.compile(r"^gateway listening on (\S+:\d+)"),
                stderr=tmp_path / "gateway.log",
            )
        )
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{rest}", timeout=60, limits=limits)
        )
        for _ in range(600):
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        at_start = memory(processes)

        sent = 0
        failures: list[str] = []
        seconds: list[float] = []
        began = time.monotonic()
        warm_at = began + SECONDS * WARM_UP
        end_at = began + SECONDS
        warm: dict[str, int] = {}

        async def worker() -> None:
            nonlocal sent, warm
            while time.monotonic() < end_at:
                number = sent
                sent += 1
                t0 = time.perf_counter()
                try:
                    if number % STREAM_EVERY == 0:
                        await ask_streamed(http)
                    else:
                        body = {
                            **QUESTION,
                            "messages": [{"role": "user", "content": f"Question {number}?"}],
                        }
                        reply = await http.post("/v1/chat/completions", json=body)
                        if reply.status_code != 200:
                            raise AssertionError(f"HTTP {reply.status_code}: {reply.text[:200]}")
                except Exception as exc:  # every failure is counted with what it was
                    failures.append(f"#{number}: {type(exc).__name__}: {exc}"[:300])
                seconds.append(time.perf_counter() - t0)
                if not warm and time.monotonic() >= warm_at:
                    warm = memory(processes)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        took = time.monotonic() - began
        at_end = memory(processes)

        print(
            f"soak: {sent} requests in {took:.0f} s ({sent / took:.0f}/s) at concurrency"
            f" {CONCURRENCY}, {len(failures)} failed, p50 {percentile(seconds, 50) * 1000:.1f} ms,"
            f" p99 {percentile(seconds, 99) * 1000:.1f} ms"
        )
        for name in processes:
            print(
                f"  {name}: RSS {at_start[name] / MiB:.1f} MiB at start,"
                f" {warm[name] / MiB:.1f} after the warm-up, {at_end[name] / MiB:.1f} at the end"
                f" ({(at_end[name] - warm[name]) / MiB:+.1f})"
            )
        assert failures == [], failures[:5]
        for name in processes:
            allowed = max(GROWTH_BYTES, int(warm[name] * GROWTH_SHARE))
            assert at_end[name] - warm[name] <= allowed, (
                f"{name} grew {(at_end[name] - warm[name]) / MiB:.1f} MiB after the warm-up"
            )
        for name, proc in processes.items():
            assert await proc.stop() == 0, f"{name} did not stop cleanly"
