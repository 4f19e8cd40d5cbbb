"""Every REST error: one table from gRPC status to HTTP status, one OpenAI-shaped body.

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}

Services and the pipeline raise :class:`~opea_grpc.errors.ServiceError` (or fail with a gRPC
status downstream); routes raise :class:`HTTPError` for what only HTTP knows (a body too large,
malformed JSON). Nothing else reaches the client: any other exception is a 500 whose message
says only that, logged once with its traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import orjson
from starlette.responses import Response

from opea_grpc.errors import status_of

_log = logging.getLogger(__name__)

C = grpc.StatusCode


@dataclass(frozen=True, slots=True)
class Mapped:
    http: int
    type: str


#: gRPC status -> HTTP status and the OpenAI error ``type``.
STATUS_TABLE: dict[grpc.StatusCode, Mapped] = {
    C.INVALID_ARGUMENT: Mapped(400, "invalid_request_error"),
    C.FAILED_PRECONDITION: Mapped(400, "invalid_request_error"),
    C.OUT_OF_RANGE: Mapped(400, "invalid_request_error"),
    C.UNAUTHENTICATED: Mapped(401, "authentication_error"),
    C.PERMISSION_DENIED: Mapped(403, "permission_error"),
    C.NOT_FOUND: Mapped(404, "not_found_error"),
    C.ALREADY_EXISTS: Mapped(409, "conflict_error"),
    C.ABORTED: Mapped(409, "conflict_error"),
    C.RESOURCE_EXHAUSTED: Mapped(429, "rate_limit_error"),
    C.CANCELLED: Mapped(499, "cancelled"),
    C.UNIMPLEMENTED: Mapped(501, "not_implemented_error"),
    C.UNAVAILABLE: Mapped(503, "service_unavailable_error"),
    C.DEADLINE_EXCEEDED: Mapped(504, "timeout_error"),
    C.INTERNAL: Mapped(500, "server_error"),
    C.UNKNOWN: Mapped(500, "server_error"),
    C.DATA_LOSS: Mapped(500, "server_error"),
}
_SERVER = Mapped(500, "server_error")

#: Seconds a client should wait after a 429 or 503 before trying again.
RETRY_AFTER = 1


class HTTPError(Exception):
    """An error only HTTP knows about; becomes the OpenAI error body with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )


def body(message: str, type: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """The OpenAI error JSON."""
    error = {"message": message, "type": type, "param": param, "code": code}
    return orjson.dumps({"error": error})


def response(status: int, content: bytes) -> Response:
    headers = {"retry-after": str(RETRY_AFTER)} if status in (429, 503) else None
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def of_status(code: grpc.StatusCode, message: str, *, param: str | None = None) -> Response:
    """The response for a gRPC status."""
    mapped = STATUS_TABLE.get(code, _SERVER)
    return response(mapped.http, body(message, mapped.type, param=param, code=_code(code)))


def _code(code: grpc.StatusCode) -> str:
    return str(code.name).lower()


def of_exception(exc: BaseException) -> Response:
    """The response for any exception a route let through."""
    if isinstance(exc, HTTPError):
        return response(exc.status, body(exc.message, exc.type, param=exc.param, code=exc.code))
    code, message = status_of(exc)
    if code is C.INTERNAL and message == type(exc).__name__:
        _log.error("unexpected error", exc_info=exc)
        message = "internal error in the gateway; the log has the details"
    return of_status(code, message)


def event(exc: BaseException) -> bytes:
    """The SSE ``data:`` payload of an error after a stream began."""
    if isinstance(exc, HTTPError):
        return body(exc.message, exc.type, param=exc.param, code=exc.code)
    code, message = status_of(exc)
    if code is C.INTERNAL and message == type(exc).__name__:
        _log.error("unexpected error in a stream", exc_info=exc)
        message = "internal error in the gateway; the log has the details"
    mapped = STATUS_TABLE.get(code, _SERVER)
    return body(message, mapped.type, code=_code(code))
