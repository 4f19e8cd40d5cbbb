"""The error types of the framework.

Services raise :class:`ServiceError` with a gRPC status code and a message meant for the caller;
the server turns it into that status. Any other exception becomes ``INTERNAL``, logged once with
its traceback on the server and never shown to the caller.
"""

from __future__ import annotations

import asyncio

import grpc


class ServiceError(Exception):
    """A failure to report to the caller as a gRPC status.

    >>> raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "input is empty: send a text")
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        if code is grpc.StatusCode.OK:
            raise ValueError("a ServiceError cannot carry StatusCode.OK")
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"


class GraphError(ValueError):
    """A pipeline graph that cannot run: unknown node, cycle, edge with no adapter."""


class NodeError(Exception):
    """A required pipeline node failed; names the node and the status it ended with."""

    def __init__(self, node: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"node {node!r} failed with {code.name}: {message}")
        self.node = node
        self.code = code
        self.message = message


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status an exception stands for (INTERNAL when it stands for none)."""
    if isinstance(exc, ServiceError | NodeError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):  # distinct types before 3.11
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}"
