"""MemoryCache: LRU order, time to live, and no stale entry across a clear()."""

from __future__ import annotations

import pytest

from opea_grpc.cache import MemoryCache


async def test_least_recently_used_goes_first() -> None:
    c = MemoryCache(2)
    for key in (b"a", b"b"):
        assert await c.get(key) is None
        await c.put(key, key.upper())
    assert await c.get(b"a") == b"A"  # a is now the most recent
    assert await c.get(b"c") is None
    await c.put(b"c", b"C")
    assert await c.get(b"b") is None
    assert await c.get(b"a") == b"A"
    assert (c.hits, c.misses) == (2, 4)


async def test_entries_expire_after_their_ttl() -> None:
    now = [1000.0]
    c = MemoryCache(10, ttl=5, clock=lambda: now[0])
    await c.get(b"k")
    await c.put(b"k", b"v")
    now[0] += 4.9
    assert await c.get(b"k") == b"v"
    now[0] += 0.2
    assert await c.get(b"k") is None
    assert len(c) == 0


async def test_a_reply_fetched_across_a_clear_is_not_stored() -> None:
    c = MemoryCache(10)
    assert await c.get(b"k") is None  # a run misses and calls the service ...
    await c.clear()  # ... a write lands meanwhile ...
    await c.put(b"k", b"old")  # ... and the reply from before the write is dropped
    assert await c.get(b"k") is None
    await c.put(b"k", b"new")
    assert await c.get(b"k") == b"new"


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryCache(0)
    with pytest.raises(ValueError, match="ttl"):
        MemoryCache(1, ttl=-1)
