"""The deadline of the request being served, carried to every outbound call.

gRPC Python does not propagate deadlines: a handler that calls another service must pass the
time it has left itself. The server records each incoming call's deadline in a context variable
(every call runs in its own task, so the value is per request); clients bound their ``timeout=``
by it. The gateway opens a scope for each REST request the same way.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("opea_grpc_deadline", default=None)


def remaining() -> float | None:
    """Seconds left for the current request, or None when it has no deadline."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def bound(timeout: float) -> float:
    """``timeout``, shortened to what the current request has left (never negative).

    When the request's deadline is the limit, a margin of 1 % + 1 ms is kept back: gRPC rounds
    a timeout up when it encodes it (to 10 ms between 1 and 10 s, 100 ms up to 100 s ...), and
    the callee must not get more time than the caller has, or the caller times out first.
    """
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if timeout < left * 0.99 - 0.001:
        return timeout
    return max(0.0, left * 0.99 - 0.001)


def set_at(when: float) -> None:
    """Record that the current task must finish by ``when`` (a ``time.monotonic()`` value)."""
    _deadline.set(when)


def clear() -> None:
    """Forget the deadline in the current context (work done for several requests at once)."""
    _deadline.set(None)


class scope:  # lower case: used like a function, ``with deadline.scope(5.0):``
    """Run a block under a deadline no later than the one already in force.

    >>> with scope(5.0):
    ...     pass  # outbound calls here get at most 5 s
    """

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        end = time.monotonic() + self._seconds
        current = _deadline.get()
        self._token = _deadline.set(end if current is None or end < current else current)

    def __exit__(self, *exc_info: object) -> None:
        _deadline.reset(self._token)
