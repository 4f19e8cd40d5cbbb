"""A circuit breaker per downstream target: stop calling what keeps failing, and try it again.

grpcio has retries but no outlier ejection: a downstream that answers every call with an error
(or never answers in time) keeps receiving every call, each of which waits for its own failure.
A :class:`Breaker` watches the outcome of the calls a typed client makes and, while it is open,
fails new calls at once with ``UNAVAILABLE`` naming the downstream, so an optional pipeline
node degrades without waiting and a required one answers 503 at once::

    closed     every call goes through; outcomes are counted over the last ``window`` seconds.
               At least ``min_calls`` calls of which at least ``failure_ratio`` failed: open.
    open       calls fail fast for ``open_time`` seconds, then the breaker is half-open.
    half-open  ``probes`` calls at a time go through; the first success closes the breaker
               (with a fresh window), a failure opens it again for another ``open_time``.

A failure is a status that says the downstream is unwell: UNAVAILABLE, DEADLINE_EXCEEDED,
INTERNAL, UNKNOWN, DATA_LOSS. Any other status means the downstream answered (a bad argument, a
missing collection, a deliberate RESOURCE_EXHAUSTED) and counts as a success. A call the caller
cancelled counts as neither, and so does one that ran out of a deadline shorter than
``min_deadline`` (the caller's choice, say ``opea.timeout: 0.01``, says nothing about the
downstream's health, and must not let one client open the circuit for everyone).

>>> breaker = Breaker("rerank (127.0.0.1:50053)")
>>> with breaker.admit():          # raises ServiceError(UNAVAILABLE) while open
...     reply = await stub.Rerank(request, timeout=2.0)

The typed clients of :mod:`opea_grpc.client` take one as ``breaker=``; ``Breaker.of(name,
config)`` builds it from ``OPEA_CLIENT_BREAKER_*`` (None when ``OPEA_CLIENT_BREAKER=false``).
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from types import TracebackType

import grpc

from opea_grpc.config import ClientConfig
from opea_grpc.errors import ServiceError

_log = logging.getLogger(__name__)

C = grpc.StatusCode
#: Statuses that count against a downstream.
FAILURES = frozenset({C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.INTERNAL, C.UNKNOWN, C.DATA_LOSS})
#: Slices the window is counted in: outcomes age out one slice at a time.
SLICES = 10


class State(enum.IntEnum):
    """A breaker's state; the values are those of the ``opea_gateway_breaker_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class _Ticket:
    """One admitted call: records how it ended when its ``with`` block exits."""

    __slots__ = ("_breaker", "_probe", "_short")

    def __init__(self, breaker: Breaker, probe: bool, short: bool = False) -> None:
        self._breaker, self._probe, self._short = breaker, probe, short

    def __enter__(self) -> _Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._breaker.record(True, self._probe)
        elif isinstance(exc, grpc.aio.AioRpcError | ServiceError):
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc.code
            if code is C.DEADLINE_EXCEEDED and self._short:
                # the caller gave it less time than a fair call needs: not the downstream's fault
                self._breaker.record(None, self._probe)
            else:
                self._breaker.record(code not in FAILURES, self._probe)
        else:  # cancelled, closed early by the consumer: says nothing about the downstream
            self._breaker.record(None, self._probe)


class Breaker:
    """Closed, open or half-open, for one downstream target; see the module's docstring."""

    def __init__(
        self,
        name: str,
        *,
        failure_ratio: float = 0.5,
        min_calls: int = 20,
        window: float = 10.0,
        open_time: float = 5.0,
        probes: int = 1,
        min_deadline: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if min_calls < 1 or probes < 1:
            raise ValueError("min_calls and probes must be at least 1")
        if window <= 0 or open_time <= 0:
            raise ValueError("window and open_time must be positive")
        self.name = name
        self.failure_ratio, self.min_calls, self.probes = failure_ratio, min_calls, probes
        self.window, self.open_time = window, open_time
        self._clock = clock
        self._slice = window / SLICES
        self._calls = [0] * SLICES
        self._failures = [0] * SLICES
        self._current = 0  # the number of the slice being counted into
        self.state = State.CLOSED
        self._opened_at = 0.0
        self._probing = 0
        self.min_deadline = min_deadline
        self._tickets = {
            (probe, short): _Ticket(self, probe, short)
            for probe in (False, True)
            for short in (False, True)
        }
        #: Calls refused while open or half-open, since the start.
        self.rejected = 0
        #: Times the breaker opened, since the start.
        self.opened = 0

    @classmethod
    def of(cls, name: str, config: ClientConfig) -> Breaker | None:
        """The breaker ``config`` asks for (``OPEA_CLIENT_BREAKER_*``); None when it is off."""
        if not config.breaker:
            return None
        return cls(
            name,
            failure_ratio=config.breaker_failure_ratio,
            min_calls=config.breaker_min_calls,
            window=config.breaker_window,
            open_time=config.breaker_open_time,
            probes=config.breaker_probes,
            min_deadline=config.breaker_min_deadline,
        )

    def admit(self, seconds: float = math.inf) -> _Ticket:
        """A ticket for one call of ``seconds`` at most (use it as a context manager), or
        UNAVAILABLE at once. A call given less than ``min_deadline`` that runs out of time counts
        as neither success nor failure: a caller's short deadline must not open the circuit to a
        healthy downstream."""
        short = seconds < self.min_deadline
        if self.state is State.CLOSED:
            return self._tickets[False, short]
        now = self._clock()
        if self.state is State.OPEN and now - self._opened_at >= self.open_time:
            self.state = State.HALF_OPEN
            self._probing = 0
            _log.info("circuit to %s half-open: probing", self.name)
        if self.state is State.HALF_OPEN and self._probing < self.probes:
            self._probing += 1
            return self._tickets[True, short]
        self.rejected += 1
        raise self._refusal(now)

    def record(self, ok: bool | None, probe: bool) -> None:
        """How an admitted call ended: True a success, False a failure, None neither."""
        if probe:
            self._probing = max(0, self._probing - 1)
            if ok is True:
                self._close()
            elif ok is False:
                self._open(self._clock(), "a probe failed")
            return
        if ok is None or self.state is not State.CLOSED:
            return  # admitted before the breaker opened: the probes decide now
        now = self._clock()
        index = self._advance(now)
        self._calls[index] += 1
        if ok:
            return
        self._failures[index] += 1
        calls, failures = sum(self._calls), sum(self._failures)
        if calls >= self.min_calls and failures >= self.failure_ratio * calls:
            self._open(now, f"{failures} of the last {calls} calls failed")

    def counts(self) -> tuple[int, int]:
        """Calls and failures counted in the current window (closed state only)."""
        self._advance(self._clock())
        return sum(self._calls), sum(self._failures)

    def _advance(self, now: float) -> int:
        """Age out the slices older than the window; the index of the slice ``now`` falls in."""
        number = int(now / self._slice)
        gap = number - self._current
        if gap:
            for step in range(1, min(gap, SLICES) + 1):
                index = (self._current + step) % SLICES
                self._calls[index] = self._failures[index] = 0
            self._current = number
        return number % SLICES

    def _open(self, now: float, why: str) -> None:
        self.state = State.OPEN
        self._opened_at = now
        self.opened += 1
        _log.warning(
            "circuit to %s open: %s; calls fail fast for %.3g s", self.name, why, self.open_time
        )

    def _close(self) -> None:
        self.state = State.CLOSED
        self._calls = [0] * SLICES
        self._failures = [0] * SLICES
        _log.info("circuit to %s closed: a probe succeeded", self.name)

    def _refusal(self, now: float) -> ServiceError:
        left = max(0.0, self.open_time - (now - self._opened_at))
        when = f"for {left:.1f} s more" if left else "while a probe call tests it"
        return ServiceError(
            C.UNAVAILABLE,
            f"{self.name} is failing: its circuit breaker is open, calls fail fast {when}",
            trailing_metadata=(("retry-after", str(max(1, math.ceil(left)))),),
        )
