"""Tracing with OpenTelemetry: configured once per process from the standard ``OTEL_*`` variables.

Off unless asked for, and then free: with tracing off no interceptor is installed and the
pipeline checks one module global per node. It is on when ``OTEL_TRACES_EXPORTER`` names an
exporter (``otlp``, ``console``; a comma list) or an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and
``OTEL_SDK_DISABLED`` is not true. The SDK reads the rest itself: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*``.

Once on, every gRPC server span and client span carries W3C trace context in the call's metadata
(the contrib gRPC instrumentation), each pipeline node gets a span of its own, and the gateway
opens one span per REST request: one request is one trace across every process.

>>> telemetry.configure("opea-rerank", os.environ)   # at the entrypoint, before any channel
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opea_grpc.config import ConfigError, parse_bool

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

#: The tracer of this process, or None while tracing is off (the hot paths test this).
tracer: Tracer | None = None
_provider: TracerProvider | None = None

#: Services whose calls get no span: probes and tool traffic, not requests.
_UNTRACED = ("grpc.health.v1.", "grpc.reflection.")
_EXPORTERS = ("otlp", "console")


def exporters(env: Mapping[str, str]) -> tuple[str, ...]:
    """The span exporters the environment asks for (none: tracing stays off)."""
    if parse_bool(env.get("OTEL_SDK_DISABLED", "false"), name="OTEL_SDK_DISABLED"):
        return ()
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ("otlp",) if endpoint else ()
    chosen = tuple(dict.fromkeys(n.strip() for n in named.split(",") if n.strip()))
    if chosen == ("none",):
        return ()
    unknown = [n for n in chosen if n not in _EXPORTERS]
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not one of "
            f"{', '.join(_EXPORTERS)}, none"
        )
    protocol = env.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if "otlp" in chosen and protocol.strip().lower() != "grpc":
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; use grpc "
            "(an OpenTelemetry collector or Jaeger listens on port 4317)"
        )
    return chosen


def configure(service_name: str, env: Mapping[str, str]) -> bool:
    """Turn tracing on when ``env`` asks for it; return whether it is on.

    ``service_name`` is the default ``service.name``; ``OTEL_SERVICE_NAME`` wins.
    """
    global tracer, _provider
    chosen = exporters(env)
    if not chosen or tracer is not None:
        return tracer is not None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    for name in chosen:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    tracer = provider.get_tracer("opea_grpc")
    log.info("tracing on: %s as %s", ", ".join(chosen), resource.attributes[SERVICE_NAME])
    return True


def shutdown() -> None:
    """Export what is buffered and stop (at process exit)."""
    global tracer, _provider
    provider, _provider, tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def annotate(attributes: Mapping[str, str | int | float | bool]) -> None:
    """Set ``attributes`` on the current span (a no-op while tracing is off)."""
    if tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(attributes)


def _traced(details: Any) -> bool:
    method = getattr(details, "method", "")
    if isinstance(method, bytes):
        method = method.decode()
    return not method.lstrip("/").startswith(_UNTRACED)


def server_interceptors() -> Sequence[Any]:
    """The server interceptor that opens a span per call (none while tracing is off)."""
    if tracer is None:
        return ()
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    interceptor = aio_server_interceptor(tracer_provider=_provider, filter_=_traced)  # type: ignore[no-untyped-call]
    return (interceptor,)


def client_interceptors() -> Sequence[Any]:
    """The channel interceptors that open a client span per call and send trace context."""
    if tracer is None:
        return ()
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    made = aio_client_interceptors(tracer_provider=_provider, filter_=_traced)  # type: ignore[no-untyped-call]
    return tuple(made)
