"""Tracing with OpenTelemetry: configured once per process from the standard ``OTEL_*`` variables.

Off unless asked for, and then free: with tracing off every hot path checks one module global
(:data:`tracer`) and does nothing more. It is on when ``OTEL_TRACES_EXPORTER`` names an
exporter (``otlp``, ``console``; a comma list) or an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and
``OTEL_SDK_DISABLED`` is not true. The SDK reads the rest itself: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*``.

Once on, each call a service serves gets a server span (opened by the wrapper every method
already runs behind, :mod:`opea_grpc.interceptor`, not by a gRPC interceptor: the contrib
instrumentation's grpc.aio interceptors cost about 0.1 ms of CPU more per call), each typed
client call a client span whose W3C trace context travels in the call's metadata, each pipeline
node a span of its own, and the gateway's REST requests a server span: one request is one trace
across every process. Health and reflection calls get none.

>>> telemetry.configure("opea-rerank", os.environ)   # at the entrypoint, before any channel
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import grpc

from opea_grpc.config import ConfigError, parse_bool

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

#: The tracer of this process, or None while tracing is off (the hot paths test this).
tracer: Tracer | None = None
_provider: TracerProvider | None = None

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


def _rpc(method: str) -> tuple[str, dict[str, str]]:
    """The span name and attributes of ``/package.Service/Method`` (OpenTelemetry RPC
    conventions: ``package.Service/Method``)."""
    name = method.lstrip("/")
    service, _, rpc_method = name.partition("/")
    return name, {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc_method}


def unsampled(metadata: Any) -> bool:
    """Whether the caller's trace context (``traceparent`` in ``metadata``) says it is not
    sampled (the flags' lowest bit clear): then the call records nothing and costs little."""
    for key, value in metadata or ():
        if key == "traceparent":
            flags = value[-2:] if isinstance(value, str) else ""
            return len(flags) == 2 and flags in _UNSAMPLED
    return False


#: ``traceparent`` flags with the sampled bit clear (``00``, ``02`` with the random bit ...).
_UNSAMPLED = frozenset(f"{n:02x}" for n in range(256) if not n & 1)


@contextmanager
def remote(metadata: Any) -> Iterator[None]:
    """The caller's trace context, current without a span of its own: calls made from here
    carry it on (still unsampled) instead of starting traces of their own."""
    from opentelemetry import context, propagate

    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)


def recording() -> bool:
    """Whether the current span records (False under an unsampled request)."""
    from opentelemetry import trace

    return trace.get_current_span().is_recording()


def server_span(method: str, metadata: Any) -> AbstractContextManager[Span]:
    """The server span of one call, current while it runs, child of the caller's span when the
    call's metadata carries W3C trace context (tracing on)."""
    from opentelemetry import propagate, trace

    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    name, attributes = _rpc(method)
    return typing.cast("Tracer", tracer).start_as_current_span(
        name,
        context=propagate.extract(carrier),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def client_span(method: str) -> tuple[Span | None, tuple[tuple[str, str], ...]]:
    """A client span for one outbound call, child of the current span, and the metadata that
    carries its context to the server (tracing on). End it with :func:`end`. Under a request
    that is not sampled there is no span: the metadata only tells the server so."""
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    current = trace.get_current_span()
    if current.get_span_context().is_valid and not current.is_recording():
        propagate.inject(carrier)
        return None, tuple(carrier.items())
    name, attributes = _rpc(method)
    span = typing.cast("Tracer", tracer).start_span(
        name, kind=trace.SpanKind.CLIENT, attributes=attributes
    )
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, tuple(carrier.items())


def end(span: Span | None, code: grpc.StatusCode, message: str = "") -> None:
    """Record the call's status on ``span`` and end it."""
    if span is None:
        return
    from opentelemetry import trace

    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {message}"))
    span.end()
