"""Bearer keys on gRPC calls: service-to-service keys for meshes without mutual TLS.

A service started with ``OPEA_SERVICE_KEYS`` (``sha256:<hex>`` digests, comma-separated: more
than one lets a key be rotated) refuses every call that does not present one of the keys as
``authorization: Bearer KEY`` metadata with UNAUTHENTICATED; health and reflection stay open,
so probes and ``grpcurl list`` still work. Callers send the key from ``OPEA_CLIENT_SERVICE_KEY``
on every call (:func:`bearer_interceptors`). Keys are compared by digest in constant time and
never logged. ``opea-grpc keys service`` makes one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from opea_grpc.errors import ServiceError

PREFIX = "sha256:"
#: Services every caller may use: health probes and reflection.
OPEN_SERVICES = ("/grpc.health.", "/grpc.reflection.")


def digest(key: str) -> str:
    """What a server keeps of ``key``: ``sha256:`` and the hex digest."""
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()


def new_key(prefix: str = "og-") -> str:
    return prefix + secrets.token_urlsafe(32)


def is_digest(text: str) -> bool:
    hexpart = text[len(PREFIX) :]
    return (
        text.startswith(PREFIX)
        and len(hexpart) == 64
        and all(c in "0123456789abcdef" for c in hexpart.lower())
    )


def bearer(authorization: str | bytes | None) -> str:
    """The key of an ``authorization`` value (``Bearer KEY``), or an empty string."""
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    if not authorization:
        return ""
    kind, _, value = authorization.strip().partition(" ")
    return value.strip() if kind.lower() == "bearer" else ""


def refusal(
    handler: grpc.RpcMethodHandler[Any, Any], refused: ServiceError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as ``handler`` that ends each call with ``refused``."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(refused.code, refused.message, refused.trailing_metadata)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(refused.code, refused.message, refused.trailing_metadata)
        yield  # pragma: no cover - abort raises

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


if TYPE_CHECKING:  # the classes are generic to the type checker only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Unary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _Stream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor
    _Unary = grpc.aio.UnaryUnaryClientInterceptor
    _Stream = grpc.aio.UnaryStreamClientInterceptor

_MISSING = ServiceError(
    grpc.StatusCode.UNAUTHENTICATED,
    "this service needs a service key: send 'authorization: Bearer KEY' metadata "
    "(OPEA_CLIENT_SERVICE_KEY)",
)
_WRONG = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "the service key is not valid")


class ServiceKeys(_Interceptor):
    """Refuses calls without one of the accepted service keys (health and reflection open)."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._digests = tuple(d.lower() for d in digests)
        if not self._digests:
            raise ValueError("ServiceKeys needs at least one key digest")

    def accepts(self, key: str) -> bool:
        wanted = digest(key)
        found = False
        for known in self._digests:  # every entry compared: no early exit to time
            found |= hmac.compare_digest(known, wanted)
        return found

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        presented = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                presented = bearer(value)
        if not presented:
            return refusal(handler, _MISSING)
        if not self.accepts(presented):
            return refusal(handler, _WRONG)
        return handler


def _with_key(details: grpc.aio.ClientCallDetails, entry: tuple[str, str]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), entry)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _BearerUnary(_Unary):
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_key(client_call_details, self._entry), request)


class _BearerStream(_Stream):
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_key(client_call_details, self._entry), request)


def bearer_interceptors(key: str) -> tuple[_Unary, _Stream]:
    """Client side: channel interceptors that add ``authorization: Bearer KEY`` to every call
    (one per call shape: a channel files an interceptor under the first shape it matches)."""
    entry = ("authorization", f"Bearer {key}")
    return _BearerUnary(entry), _BearerStream(entry)
