"""The server interceptor every registered method runs behind.

It does two things per call: records the call's deadline for outbound calls
(:mod:`opea_grpc.deadline`), and turns exceptions into statuses: :class:`ServiceError` into its
own code and message, a downstream :class:`grpc.aio.AioRpcError` into the same status, anything
else into ``INTERNAL`` (logged here once, with its traceback; the caller sees no traceback).

It wraps each method handler once, when the service is registered, rather than per call, so
the hot path pays one extra frame and no handler lookup.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from opea_grpc import deadline
from opea_grpc.errors import ServiceError

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]

_STREAMING_FIELDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


async def _fail(method: str, exc: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(exc, ServiceError):
        if exc.trailing_metadata:
            context.set_trailing_metadata(exc.trailing_metadata)
        await context.abort(exc.code, exc.message)
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream call failed: pass its status on, naming where it came from.
        await context.abort(exc.code(), exc.details() or exc.code().name)
    log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has the details"
    )


def _set_deadline(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    remaining = context.time_remaining()
    if remaining is not None:
        deadline.set_at(time.monotonic() + remaining)


def _wrap_coroutine(method: str, behavior: Behavior) -> Behavior:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _set_deadline(context)
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(method, exc, context)

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
            await _fail(method, exc, context)

    return guarded


def guard(method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behavior wrapped; ``method`` is ``/package.Service/Method``."""
    for field in _STREAMING_FIELDS:
        behavior = getattr(handler, field)
        if behavior is None:
            continue
        is_gen = inspect.isasyncgenfunction(behavior)
        wrapped = _wrap_generator(method, behavior) if is_gen else _wrap_coroutine(method, behavior)
        return handler._replace(**{field: wrapped})  # type: ignore[attr-defined,no-any-return]
    raise ValueError(f"{method}: handler has no behavior")
