"""Response caches a pipeline node may declare: ``Node(..., cache=MemoryCache(4096, ttl=300))``.

A node with a cache answers a request it has seen (byte for byte, serialised deterministically)
from the cache instead of calling its service. Values are stored serialised, so no caller can
mutate a cached reply. :class:`MemoryCache` is an in-process LRU with a time to live; anything
with the :class:`Cache` methods (a shared store such as Redis) can stand in for it.

A run skips every cache while :data:`bypass` is set in its context::

    token = bypass.set(True)
    try:
        await graph.run(request, state=state, timeout=10.0)
    finally:
        bypass.reset(token)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextvars import ContextVar
from typing import Protocol

bypass: ContextVar[bool] = ContextVar("opea_grpc_cache_bypass", default=False)
"""While true in a run's context, nodes neither read nor fill their caches."""


class Cache(Protocol):
    """A store of serialised replies, keyed by the node and its serialised request."""

    async def get(self, key: bytes) -> bytes | None: ...

    async def put(self, key: bytes, value: bytes) -> None: ...


class MemoryCache:
    """In-process LRU of at most ``max_entries``; an entry expires ``ttl`` seconds after it was
    stored (``ttl=0``: never). Counts its hits and misses."""

    def __init__(self, max_entries: int, *, ttl: float = 0.0) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0, not {ttl}")
        self.max_entries, self.ttl = max_entries, ttl
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is not None:
            expires, value = entry
            if not self.ttl or time.monotonic() < expires:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
            del self._entries[key]
        self.misses += 1
        return None

    async def put(self, key: bytes, value: bytes) -> None:
        self._entries[key] = (time.monotonic() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry (after a write that makes them stale)."""
        self._entries.clear()
