"""Limits on what callers may ask: rate limits per API key, and the gateway's capacity.

Rate limits are token buckets for requests and for model tokens, per minute.

A request is admitted while its key has a request left and its token budget is not spent; it
takes one request at admission and is charged its real usage (prompt + completion tokens) when
it ends, so one large answer may overdraw the budget and the next requests wait until it has
refilled. A refusal says how long to wait: ``retry-after`` over REST, and over gRPC a
``google.rpc.RetryInfo`` in the status details (``grpc-status-details-bin``).

:class:`Capacity` sheds load: beyond ``OPEA_GATEWAY_MAX_IN_FLIGHT`` requests in flight (REST and
gRPC together) a new one is refused at once, 429 / RESOURCE_EXHAUSTED with a retry time, instead
of queueing without bound behind the ones being served.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from opea_grpc.errors import ServiceError


@dataclass
class Bucket:
    """``capacity`` units, refilled evenly over a minute."""

    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def wait(self, need: float) -> float:
        """Seconds until ``need`` units are there (0 when they are)."""
        missing = need - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity


@dataclass
class Limiter:
    """Requests and tokens per minute for each key name (0: no limit of that kind)."""

    requests_per_minute: int
    tokens_per_minute: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[Bucket | None, Bucket | None]] = field(default_factory=dict)

    def _of(self, key: str) -> tuple[Bucket | None, Bucket | None]:
        pair = self._buckets.get(key)
        if pair is None:
            now = self.clock()
            rpm, tpm = self.requests_per_minute, self.tokens_per_minute
            pair = self._buckets[key] = (
                Bucket(rpm, rpm, now) if rpm else None,
                Bucket(tpm, tpm, now) if tpm else None,
            )
        return pair

    def admit(self, key: str) -> None:
        """Take one request of ``key``'s budget, or raise RESOURCE_EXHAUSTED saying when."""
        requests, tokens = self._of(key)
        now = self.clock()
        wait = 0.0
        if requests is not None:
            requests.refill(now)
            wait = requests.wait(1.0)
        if tokens is not None:
            tokens.refill(now)
            wait = max(wait, tokens.wait(1.0))
        if wait > 0:
            raise exhausted(key, wait)
        if requests is not None:
            requests.level -= 1.0

    def charge(self, key: str, used: int) -> None:
        """Charge ``used`` model tokens to ``key`` (the bucket may go below zero)."""
        _, tokens = self._of(key)
        if tokens is not None and used > 0:
            tokens.refill(self.clock())
            tokens.level -= used


@dataclass
class Capacity:
    """At most ``limit`` requests in flight (0: no limit); a plain counter, no lock or await."""

    limit: int
    in_flight: int = 0
    #: Requests refused since the start.
    shed: int = 0

    def full(self) -> bool:
        """True when ``limit`` requests are in flight: the caller refuses the next one."""
        if self.limit and self.in_flight >= self.limit:
            self.shed += 1
            return True
        return False

    def enter(self) -> None:
        self.in_flight += 1

    def __post_init__(self) -> None:
        self._refused = retry_later(
            f"the gateway is at capacity ({self.limit} requests in flight,"
            " OPEA_GATEWAY_MAX_IN_FLIGHT); retry in 1 s",
            1.0,
        )

    def leave(self) -> None:
        self.in_flight -= 1

    def refusal(self) -> ServiceError:
        """RESOURCE_EXHAUSTED, retry in 1 s (its details made once: shedding stays cheap)."""
        made = self._refused
        return ServiceError(made.code, made.message, trailing_metadata=made.trailing_metadata)


def exhausted(key: str, wait: float) -> ServiceError:
    seconds = max(1, math.ceil(wait))
    return retry_later(f"rate limit of API key {key!r} reached; retry in {seconds} s", wait)


def retry_later(message: str, wait: float) -> ServiceError:
    """RESOURCE_EXHAUSTED saying to retry in ``wait`` seconds (RetryInfo and retry-after)."""
    seconds = max(1, math.ceil(wait))
    delay = duration_pb2.Duration(seconds=int(wait), nanos=int((wait % 1) * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        trailing_metadata=(
            ("grpc-status-details-bin", status.SerializeToString()),
            ("retry-after", str(seconds)),
        ),
    )
