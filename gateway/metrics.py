"""The gateway's Prometheus metrics, in a registry of its own (``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.translate import STATUS
from opea_grpc.breaker import Breaker
from opea_grpc.cache import MemoryCache, RedisCache
from opea_grpc.coalescing import Coalescer
from opea_grpc.node import NodeTiming

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Caches(Collector):
    """Hits and misses of the pipeline's caches, read when scraped."""

    def __init__(self, caches: dict[str, MemoryCache | RedisCache | None]) -> None:
        self._caches = caches

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            "opea_gateway_cache_hits", "Pipeline cache hits", labels=["node"]
        )
        misses = CounterMetricFamily(
            "opea_gateway_cache_misses", "Pipeline cache misses", labels=["node"]
        )
        for node, cache in self._caches.items():
            if cache is not None:
                hits.add_metric([node], cache.hits)
                misses.add_metric([node], cache.misses)
        yield hits
        yield misses


class _Breakers(Collector):
    """Each downstream's circuit breaker, read when scraped."""

    def __init__(self, breakers: Mapping[str, Breaker]) -> None:
        self._breakers = breakers

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "opea_gateway_breaker_state",
            "Circuit breaker of each downstream: 0 closed, 1 half-open, 2 open",
            labels=["downstream"],
        )
        opened = CounterMetricFamily(
            "opea_gateway_breaker_opened",
            "Times a downstream's breaker opened",
            labels=["downstream"],
        )
        rejected = CounterMetricFamily(
            "opea_gateway_breaker_rejected",
            "Calls failed fast by an open breaker",
            labels=["downstream"],
        )
        for name, breaker in self._breakers.items():
            state.add_metric([name], int(breaker.state))
            opened.add_metric([name], breaker.opened)
            rejected.add_metric([name], breaker.rejected)
        yield state
        yield opened
        yield rejected


class _Coalescers(Collector):
    """Calls made for requests that could share one, and those requests, read when scraped."""

    def __init__(self, coalescers: Mapping[str, Coalescer[Any, Any]]) -> None:
        self._coalescers = coalescers

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "opea_gateway_coalesced_calls",
            "Calls a node sent for requests that could share one (the mean batch is"
            " requests / calls)",
            labels=["node"],
        )
        requests = CounterMetricFamily(
            "opea_gateway_coalesced_requests",
            "Requests served by those calls",
            labels=["node"],
        )
        for node, coalescer in self._coalescers.items():
            calls.add_metric([node], coalescer.calls)
            requests.add_metric([node], coalescer.requests)
        yield calls
        yield requests


class Metrics:
    def __init__(
        self,
        caches: dict[str, MemoryCache | RedisCache | None],
        breakers: Mapping[str, Breaker] | None = None,
        coalescers: Mapping[str, Coalescer[Any, Any]] | None = None,
    ) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "opea_gateway_requests",
            "REST requests by route and HTTP status",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "opea_gateway_request_seconds",
            "REST request latency (to the last byte)",
            ["route"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "opea_gateway_in_flight", "REST requests in progress", ["route"], registry=registry
        )
        self.first_token = Histogram(
            "opea_gateway_time_to_first_token_seconds",
            "Streamed chat: time from request to the first content chunk",
            buckets=_SECONDS,
            registry=registry,
        )
        self.nodes = Histogram(
            "opea_gateway_node_seconds",
            "Pipeline node durations by outcome",
            ["node", "outcome"],
            buckets=_SECONDS,
            registry=registry,
        )
        registry.register(_Caches(caches))
        registry.register(_Breakers(breakers or {}))
        registry.register(_Coalescers(coalescers or {}))
        #: Paths labelled by name; any other path is ``other`` (no label per scanned URL).
        self.routes: set[str] = set()
        # Children by label values, looked up once: labels() costs more than inc().
        self._in_flight: dict[str, Any] = {}
        self._ended: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._nodes: dict[tuple[str, int], Any] = {}

    def in_flight_of(self, route: str) -> Any:
        child = self._in_flight.get(route)
        if child is None:
            child = self._in_flight[route] = self.in_flight.labels(route)
        return child

    def finished(self, route: str, status: int, seconds: float) -> None:
        children = self._ended.get((route, status))
        if children is None:
            children = self._ended[(route, status)] = (
                self.requests.labels(route, str(status)),
                self.latency.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def record_node(self, timing: NodeTiming) -> None:
        """One node of one request ended (the pipeline's observer)."""
        child = self._nodes.get((timing.name, timing.status))
        if child is None:
            child = self._nodes[(timing.name, timing.status)] = self.nodes.labels(
                timing.name, STATUS[timing.status]
            )
        child.observe(timing.duration)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
