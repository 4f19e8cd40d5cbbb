"""The server interceptor every registered method runs behind.

Per call it records the call's deadline for outbound calls (:mod:`opea_grpc.deadline`), and
turns exceptions into statuses: :class:`ServiceError` into its own code and message, a downstream
:class:`grpc.aio.AioRpcError` into the same status, ``NotImplementedError`` (what a generated
servicer's methods raise until overridden) into ``UNIMPLEMENTED``, anything else into
``INTERNAL`` (logged here once, with its traceback; the caller sees no traceback). When the
server keeps metrics (:mod:`opea_grpc.metrics`) it also counts and times the call, its status
and, for a stream, its first and following messages; the in-flight gauge comes down however the
call ends.

It wraps each method handler once, when the service is registered, rather than per call, so
the hot path pays one extra frame and no handler lookup. A request whose bytes do not parse as
the method's message is answered INVALID_ARGUMENT (grpcio would answer UNKNOWN, quoting the
exception).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from opea_grpc import deadline, logs, telemetry
from opea_grpc.errors import NodeError, ServiceError, status_of
from opea_grpc.logs import REQUEST_ID_KEY
from opea_grpc.metrics import MethodMetrics, RpcMetrics

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]

_STREAMING_FIELDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _status(
    method: str, exc: Exception, context: grpc.aio.ServicerContext[Any, Any]
) -> tuple[grpc.StatusCode, str, Any]:
    """The status an exception ends a call with (logging the unexpected ones)."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.trailing_metadata
    if isinstance(exc, NodeError):  # a pipeline node failed: its status, naming the node
        return exc.code, str(exc), None
    if isinstance(exc, NotImplementedError):  # a generated servicer's method left as it is
        return grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server", None
    code, message = status_of(exc)  # a downstream's status passed on; a timeout's
    if code is not grpc.StatusCode.INTERNAL or isinstance(exc, grpc.aio.AioRpcError):
        return code, message, None
    # Read only now, off the hot path: the caller's request id, for the log line.
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            logs.request_id.set(value[:128])
    log.error("unhandled error in %s", method, exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error in {method}; the server log has the details",
        None,
    )


async def _fail(
    code: grpc.StatusCode, message: str, trailing: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    if trailing:
        context.set_trailing_metadata(trailing)
    await context.abort(code, message)


def _set_deadline(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    remaining = context.time_remaining()
    if remaining is not None:
        deadline.set_at(time.monotonic() + remaining)


def _stopped(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """Why a handler was cancelled: its deadline passed, or the client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _aborted(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class _Malformed:
    """A request whose bytes did not parse; the method's handler is never given it."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``parse``, returning a :class:`_Malformed` where it would raise (grpcio: UNKNOWN)."""
    if parse is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Malformed(str(exc))

    return tolerant


def _checked(method: str, behavior: Behavior) -> Behavior:
    """``behavior``, refusing a malformed request with INVALID_ARGUMENT (a plain call, no frame
    left on the stack while the handler runs or streams)."""

    def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if type(request) is _Malformed:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request to {method} is not a valid message: {request.error}",
            )
        return behavior(request, context)

    return checked


def _wrap_coroutine(method: str, behavior: Behavior) -> Behavior:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _set_deadline(context)
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(*_status(method, exc, context), context)

    return guarded


def _wrap_generator(method: str, behavior: Behavior) -> Behavior:
    async def guarded(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        _set_deadline(context)
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(*_status(method, exc, context), context)

    return guarded


def _metered_coroutine(method: str, behavior: Behavior, m: MethodMetrics) -> Behavior:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _set_deadline(context)
        m.started.inc()
        m.in_flight.inc()
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            code = _aborted(context)
            raise
        except asyncio.CancelledError:
            code = _stopped(context)
            raise
        except Exception as exc:
            code, message, trailing = _status(method, exc, context)
            await _fail(code, message, trailing, context)
        finally:
            m.in_flight.dec()
            m.handled(code).inc()
            m.seconds.observe(time.perf_counter() - began)

    return guarded


def _metered_generator(method: str, behavior: Behavior, m: MethodMetrics) -> Behavior:
    async def guarded(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        _set_deadline(context)
        m.started.inc()
        m.in_flight.inc()
        began = last = time.perf_counter()
        code = grpc.StatusCode.OK
        sent = 0
        try:
            async for item in behavior(request, context):
                now = time.perf_counter()
                (m.gap if sent else m.first).observe(now - last)
                last = now
                sent += 1
                yield item
        except grpc.aio.AbortError:
            code = _aborted(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = _stopped(context)
            raise
        except Exception as exc:
            code, message, trailing = _status(method, exc, context)
            await _fail(code, message, trailing, context)
        finally:
            m.in_flight.dec()
            m.sent.inc(sent)
            m.handled(code).inc()
            m.seconds.observe(time.perf_counter() - began)

    return guarded


def _traced_coroutine(method: str, behavior: Behavior) -> Behavior:
    async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        metadata = context.invocation_metadata()
        if telemetry.unsampled(metadata):
            with telemetry.remote(metadata):
                return await behavior(request, context)
        with telemetry.server_span(method, metadata) as span:
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _aborted(context)
                raise
            except asyncio.CancelledError:
                code = _stopped(context)
                raise
            finally:
                telemetry.end(span, code, context.details() or "")

    return traced


def _traced_generator(method: str, behavior: Behavior) -> Behavior:
    async def traced(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        metadata = context.invocation_metadata()
        if telemetry.unsampled(metadata):
            with telemetry.remote(metadata):
                async for item in behavior(request, context):
                    yield item
            return
        with telemetry.server_span(method, metadata) as span:
            code = grpc.StatusCode.OK
            began, sent = time.perf_counter(), 0
            try:
                async for item in behavior(request, context):
                    if not sent:
                        first = (time.perf_counter() - began) * 1000
                        span.set_attribute("opea.stream.time_to_first_message_ms", round(first, 3))
                    sent += 1
                    yield item
            except grpc.aio.AbortError:
                code = _aborted(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = _stopped(context)
                raise
            finally:
                span.set_attribute("opea.stream.messages", sent)
                telemetry.end(span, code, context.details() or "")

    return traced


def guard(
    method: str, handler: grpc.RpcMethodHandler[Any, Any], metrics: RpcMetrics | None = None
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behavior wrapped; ``method`` is ``/package.Service/Method``.

    With ``metrics``, each call is counted and timed there as well.
    """
    for field in _STREAMING_FIELDS:
        behavior = getattr(handler, field)
        if behavior is None:
            continue
        streams = inspect.isasyncgenfunction(behavior)
        behavior = _checked(method, behavior)
        if metrics is None:
            wrapped = (_wrap_generator if streams else _wrap_coroutine)(method, behavior)
        elif streams:
            wrapped = _metered_generator(method, behavior, metrics.method(method, "server_stream"))
        else:
            wrapped = _metered_coroutine(method, behavior, metrics.method(method, "unary"))
        if telemetry.tracer is not None:  # outermost: the span covers the whole call
            wrapped = (_traced_generator if streams else _traced_coroutine)(method, wrapped)
        return handler._replace(  # type: ignore[attr-defined,no-any-return]
            **{field: wrapped, "request_deserializer": _tolerant(handler.request_deserializer)}
        )
    raise ValueError(f"{method}: handler has no behavior")
