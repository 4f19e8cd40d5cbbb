"""Response caches a pipeline node may declare: ``Node(..., cache=MemoryCache(4096, ttl=300))``.

A node with a cache answers a request it has seen (byte for byte, serialised deterministically)
from the cache instead of calling its service. Values are stored serialised, so no caller can
mutate a cached reply. :class:`MemoryCache` is an in-process LRU with a time to live;
:class:`RedisCache` is shared by every replica that points at the same Redis (``pip install
'opea-grpc[redis]'``). A cache that cannot be reached counts a miss and never fails a call.

A run skips every cache while :data:`bypass` is set in its context::

    token = bypass.set(True)
    try:
        await graph.run(request, state=state, timeout=10.0)
    finally:
        bypass.reset(token)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol

_log = logging.getLogger(__name__)

bypass: ContextVar[bool] = ContextVar("opea_grpc_cache_bypass", default=False)
"""While true in a run's context, nodes neither read nor fill their caches."""


class Cache(Protocol):
    """A store of serialised replies, keyed by the node and its serialised request."""

    async def get(self, key: bytes) -> bytes | None: ...

    async def put(self, key: bytes, value: bytes) -> None: ...

    async def clear(self) -> None:
        """Forget every entry (after a write that makes them stale)."""
        ...


class MemoryCache:
    """In-process LRU of at most ``max_entries``; an entry expires ``ttl`` seconds after it was
    stored (``ttl=0``: never). Counts its hits and misses."""

    def __init__(
        self, max_entries: int, *, ttl: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0, not {ttl}")
        self.max_entries, self.ttl, self._clock = max_entries, ttl, clock
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        # A reply fetched across a clear() may predate the write that cleared: it is not stored.
        self._generation = 0
        self._missed: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is not None:
            expires, value = entry
            if not self.ttl or self._clock() < expires:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
            del self._entries[key]
        self.misses += 1
        if len(self._missed) > self.max_entries:
            self._missed.clear()
        self._missed[key] = self._generation
        return None

    async def put(self, key: bytes, value: bytes) -> None:
        if self._missed.pop(key, self._generation) != self._generation:
            return
        self._entries[key] = (self._clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def clear(self) -> None:
        """Forget every entry (after a write that makes them stale)."""
        self._entries.clear()
        self._generation += 1


# Keys live in a generation: clearing moves every replica to the next one at once, and the old
# entries expire on their own. One round trip per call: the generation is read by the script.
# A miss returns the generation it saw; the put that follows stores only if it is still current.
_GET = """
local generation = redis.call('GET', KEYS[1]) or '0'
local value = redis.call('GET', KEYS[1] .. ':' .. generation .. ':' .. ARGV[1])
if value then return {1, value} end
return {0, generation}
"""
_PUT = """
local generation = redis.call('GET', KEYS[1]) or '0'
if generation ~= ARGV[4] then return 0 end
local key = KEYS[1] .. ':' .. generation .. ':' .. ARGV[1]
if tonumber(ARGV[3]) > 0 then
  return redis.call('SET', key, ARGV[2], 'PX', ARGV[3])
end
return redis.call('SET', key, ARGV[2])
"""


class RedisCache:
    """A cache in Redis, shared by the replicas that use the same ``url`` and ``namespace``.

    Entries expire ``ttl`` seconds after they were stored (0: never, Redis evicts under its
    own memory policy). :meth:`clear` drops the namespace for every replica at once. Call
    :meth:`start` before use and :meth:`close` after.
    """

    def __init__(self, url: str, *, namespace: str, ttl: float = 0.0) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0, not {ttl}")
        self.url, self.namespace, self.ttl = url, namespace, ttl
        self.hits = self.misses = self.errors = 0
        self._client: Any = None
        self._get: Any = None
        self._put: Any = None
        self._missed: dict[bytes, bytes] = {}
        self._errors: tuple[type[Exception], ...] = (OSError,)

    async def start(self) -> None:
        try:
            import redis.asyncio as redis
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise RuntimeError(
                "a Redis cache needs the redis package: pip install 'opea-grpc[redis]'"
            ) from exc
        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(self.url, socket_timeout=1.0)
        self._get = self._client.register_script(_GET)
        self._put = self._client.register_script(_PUT)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            _log.warning(
                "cache %s at %s: %s (%d errors)", self.namespace, self.url, exc, self.errors
            )

    async def get(self, key: bytes) -> bytes | None:
        try:
            found, value = await self._get(keys=[self.namespace], args=[key])
        except self._errors as exc:  # an unreachable cache is a miss, never a failure
            self._failed(exc)
            self.misses += 1
            return None
        if found:
            self.hits += 1
            return bytes(value)
        self.misses += 1
        if len(self._missed) > 10_000:
            self._missed.clear()
        self._missed[key] = bytes(value)
        return None

    async def put(self, key: bytes, value: bytes) -> None:
        generation = self._missed.pop(key, None)
        if generation is None:
            return
        ttl_ms = int(self.ttl * 1000)
        try:
            await self._put(keys=[self.namespace], args=[key, value, ttl_ms, generation])
        except self._errors as exc:
            self._failed(exc)

    async def clear(self) -> None:
        try:
            await self._client.incr(self.namespace)
        except self._errors as exc:
            self._failed(exc)
