"""Two gateways sharing one Redis cache: a hit in one is a hit in the other, and a write through
either drops the cached searches of both. Redis runs from its Debian package on loopback."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.service import Settings
from gateway.service import build as build_gateway
from opea_grpc.cache import RedisCache
from tests.gateway.conftest import LOOPBACK, Stack, default_services, running
from tests.gateway.test_openai_sdk import ingest

QUESTION = {
    "model": "extractive-answerer",
    "messages": [{"role": "user", "content": "What colour are plums?"}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                proc.poll()
                if proc.returncode is not None:
                    pytest.fail(f"redis-server exited with {proc.returncode}")
                time.sleep(0.05)  # between PINGs, until it answers
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_redis_cache_generations(redis_url: str) -> None:
    cache = RedisCache(redis_url, namespace="t", ttl=60)
    await cache.start()
    try:
        assert await cache.get(b"k") is None
        await cache.put(b"k", b"v")
        assert await cache.get(b"k") == b"v"
        await cache.clear()
        assert await cache.get(b"k") is None  # the new generation starts empty
        await cache.clear()  # a write lands between the miss and the put ...
        await cache.put(b"k", b"stale")
        assert await cache.get(b"k") is None  # ... so the reply is not stored
        assert (cache.hits, cache.errors) == (1, 0)
    finally:
        await cache.close()


async def test_two_gateways_share_the_cache_and_its_invalidation(
    redis_url: str, tmp_path: Path
) -> None:
    async with running(default_services(tmp_path), cache_url=redis_url) as a:
        t = {name: s.target for name, s in a.services.items()}
        settings = Settings(
            embedding=t["embedding"], retrieval=t["retrieval"], rerank=t["rerank"], chat=t["chat"],
            rest_port=0, cache_url=redis_url,
        )  # fmt: skip
        second = build_gateway(LOOPBACK, settings)
        await second.start()
        try:
            b = Stack(second, a.services)
            await ingest(a)
            async with (
                httpx.AsyncClient(base_url=a.url) as http_a,
                httpx.AsyncClient(base_url=b.url) as http_b,
            ):
                first = (await http_a.post("/v1/chat/completions", json=QUESTION)).json()
                again = (await http_b.post("/v1/chat/completions", json=QUESTION)).json()
                assert again["opea"]["sources"] == first["opea"]["sources"]
                hits = second.gateway.pipeline.search_cache
                assert hits is not None
                assert hits.hits == 1
                plums = {"documents": [{"id": "plums.md", "text": "Plums are purple."}]}
                assert (await http_a.post("/v1/ingest", json=plums)).status_code == 200
                after = (await http_b.post("/v1/chat/completions", json=QUESTION)).json()
                assert after["opea"]["sources"][0]["id"] == "plums.md#0"
        finally:
            await second.stop(0)


async def test_an_unreachable_cache_never_fails_a_request(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    async with running(default_services(tmp_path), cache_url=url) as stack:
        await ingest(stack)
        async with httpx.AsyncClient(base_url=stack.url) as http:
            replies = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=QUESTION) for _ in range(3))
            )
        assert [r.status_code for r in replies] == [200, 200, 200]
        cache = stack.gateway.gateway.pipeline.search_cache
        assert isinstance(cache, RedisCache)
        assert cache.errors > 0
