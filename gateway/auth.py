"""API keys with scopes, for the gateway's REST routes and its gRPC face.

The keys file (``OPEA_GATEWAY_API_KEYS_FILE``) holds one key a line, never the key itself::

    # sha256 of the key          scopes            name (for the logs; optional)
    sha256:4f2a...e9 chat,embeddings reader
    sha256:9b01...c3 admin           operator

``opea-grpc keys new --scopes chat,embeddings`` makes a key and prints its line. A request
presents its key as ``Authorization: Bearer KEY`` (REST, what the ``openai`` SDK sends) or as
``authorization`` metadata (gRPC). Keys are compared by their SHA-256 digest in constant time
and never logged. ``admin`` holds every scope. Health, readiness and the API description stay
open; ``/metrics`` is open unless ``OPEA_GATEWAY_METRICS_AUTH`` closes it to ``admin``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from gateway.limits import Limiter
from opea_grpc.config import ConfigError
from opea_grpc.errors import ServiceError
from opea_grpc.keys import OPEN_SERVICES, bearer, digest, refusal
from opea_grpc.keys import PREFIX as _PREFIX

SCOPES = ("chat", "embeddings", "rerank", "search", "ingest", "admin")


@dataclass(frozen=True)
class Key:
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class KeyRing:
    """The accepted keys, by digest."""

    def __init__(self, keys: Mapping[str, Key]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_file(cls, path: str) -> KeyRing:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(
                f"OPEA_GATEWAY_API_KEYS_FILE: cannot read {path!r}: {exc.strerror}"
            ) from None
        keys: dict[str, Key] = {}
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"OPEA_GATEWAY_API_KEYS_FILE {path}:{number}"
            if len(fields) < 2 or not fields[0].startswith(_PREFIX) or len(fields[0]) != 71:
                raise ConfigError(f"{where}: expected 'sha256:<64 hex digits> scope,scope [name]'")
            scopes = frozenset(s for s in fields[1].split(",") if s)
            unknown = sorted(scopes - set(SCOPES))
            if unknown:
                raise ConfigError(f"{where}: unknown scope {unknown[0]!r}; use {', '.join(SCOPES)}")
            keys[fields[0].lower()] = Key(" ".join(fields[2:]) or f"key {number}", scopes)
        if not keys:
            raise ConfigError(f"OPEA_GATEWAY_API_KEYS_FILE {path}: holds no key")
        return cls(keys)

    def check(self, authorization: str | None, scope: str | None) -> Key:
        """The key ``authorization`` (``Bearer KEY``) names, if it may use ``scope``.

        Raises UNAUTHENTICATED for a missing or unknown key, PERMISSION_DENIED for a key
        without the scope (``None``: any valid key will do).
        """
        presented = bearer(authorization)
        if not presented:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                "no API key: send it as 'Authorization: Bearer KEY'",
            )
        wanted = digest(presented)
        found = None
        for known, key in self._keys.items():  # every entry compared: no early exit to time
            if hmac.compare_digest(known, wanted):
                found = key
        if found is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid")
        if scope is not None and not found.allows(scope):
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this API key may not use {scope!r}; it has {', '.join(sorted(found.scopes))}",
            )
        return found


#: REST routes and the scope each needs; None: any valid key. Paths not listed stay open.
ROUTES: dict[tuple[str, str], str | None] = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/chatqna"): "chat",
    ("POST", "/v1/embeddings"): "embeddings",
    ("POST", "/v1/rerank"): "rerank",
    ("POST", "/rerank"): "rerank",
    ("POST", "/v2/rerank"): "rerank",
    ("POST", "/v1/search"): "search",
    ("GET", "/v1/collections"): "search",
    ("POST", "/v1/ingest"): "ingest",
    ("POST", "/v1/documents/delete"): "ingest",
    ("GET", "/v1/models"): None,
}
#: Path prefixes for routes with parameters.
PREFIXES: tuple[tuple[str, str, str | None], ...] = (
    ("DELETE", "/v1/collections/", "ingest"),
    ("GET", "/v1/models/", None),
)
OPEN = frozenset({"/healthz", "/readyz", "/v1/health_check", "/openapi.json", "/docs"})


def route_scope(method: str, path: str, *, metrics_closed: bool) -> tuple[bool, str | None]:
    """``(guarded, scope)`` for a REST request."""
    if path in OPEN:
        return False, None
    if path == "/metrics":
        return metrics_closed, "admin"
    if (method, path) in ROUTES:
        return True, ROUTES[(method, path)]
    for m, prefix, scope in PREFIXES:
        if method == m and path.startswith(prefix):
            return True, scope
    return True, "admin"  # anything else (unknown routes included) needs a key


#: gRPC methods of the gateway's face and their scopes; health and reflection stay open.
METHODS = {
    "/opea.v1.ChatQnAService/Ask": "chat",
    "/opea.v1.ChatQnAService/AskStream": "chat",
    "/opea.v1.ModelService/ListModels": None,
}
_OPEN_SERVICES = OPEN_SERVICES


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the class is generic to the type checker only
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Refuses gRPC calls without a key that holds the method's scope."""

    def __init__(self, keys: KeyRing | None, limiter: Limiter | None = None) -> None:
        self._keys, self._limiter = keys, limiter

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = details.method
        handler = await continuation(details)
        if handler is None or method.startswith(_OPEN_SERVICES):
            return handler
        try:
            name = caller(self._keys, details.invocation_metadata, METHODS.get(method, "admin"))
            if self._limiter is not None:
                self._limiter.admit(name)
        except ServiceError as refused:
            return refusal(handler, refused)
        return handler


def caller(keys: KeyRing | None, metadata: Any, scope: str | None) -> str:
    """Who calls (the key's name; ``anonymous`` without keys), checked against ``scope``."""
    if keys is None:
        return "anonymous"
    value = dict(metadata or ()).get("authorization")
    authorization = value.decode("latin-1") if isinstance(value, bytes) else value
    return keys.check(authorization, scope).name
