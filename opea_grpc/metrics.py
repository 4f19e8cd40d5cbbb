"""Prometheus metrics of a gRPC server: calls by method and status, latency, in flight, streams.

Names follow the gRPC ecosystem's (``grpc_server_started_total``, ``grpc_server_handled_total``,
``grpc_server_handling_seconds``) so existing dashboards work; what they lack is ours:
``opea_grpc_server_in_flight`` and, for server streams, the time to the first message and
between messages (time to first token and inter-token latency of a chat stream).

A server records only when someone can read it: a ``metrics_port`` is configured (served
in a thread by :func:`serve`) or its owner exposes the registry itself (the gateway's
``/metrics``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

#: Seconds: from a cache hit to a long generation.
BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
_LABELS = ("grpc_service", "grpc_method", "grpc_type")


class MethodMetrics:
    """One method's children, looked up once (``labels()`` costs more than ``inc()``)."""

    __slots__ = ("_handled", "_labels", "_metrics", "first", "gap", "in_flight", "seconds", "sent",
                 "started")  # fmt: skip

    def __init__(self, metrics: RpcMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics, self._labels = metrics, labels
        self.started = metrics.started.labels(*labels)
        self.seconds = metrics.seconds.labels(*labels)
        self.in_flight = metrics.in_flight.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self.first = metrics.first_message.labels(*labels)
        self.gap = metrics.between_messages.labels(*labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._metrics.handled.labels(*self._labels, code.name)
        return child


class RpcMetrics:
    """The metrics of one server's calls, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry(auto_describe=True)
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server", _LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the call's start to its status, in seconds",
            _LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "opea_grpc_server_in_flight", "RPCs in progress", _LABELS, registry=registry
        )
        self.sent = Counter(
            "grpc_server_msg_sent", "Stream messages sent by the server", _LABELS, registry=registry
        )
        self.first_message = Histogram(
            "opea_grpc_server_first_message_seconds",
            "Server streams: time from the call's start to its first message (time to first "
            "token of a chat stream)",
            _LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self.between_messages = Histogram(
            "opea_grpc_server_inter_message_seconds",
            "Server streams: time between consecutive messages (inter-token latency)",
            _LABELS,
            buckets=BUCKETS,
            registry=registry,
        )

    def method(self, full_method: str, kind: str) -> MethodMetrics:
        """The children of ``/package.Service/Method``; ``kind``: ``unary``, ``server_stream``."""
        service, _, name = full_method.lstrip("/").partition("/")
        return MethodMetrics(self, (service, name, kind))


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` as Prometheus text at ``http://host:port/metrics``, in a thread."""
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
