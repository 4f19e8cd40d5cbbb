"""The circuit breaker's states, on a clock the test turns by hand."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from opea_grpc.breaker import Breaker, State
from opea_grpc.config import ClientConfig, ConfigError, load
from opea_grpc.errors import ServiceError

C = grpc.StatusCode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom", "")


def call(
    breaker: Breaker,
    outcome: grpc.StatusCode | BaseException | None = None,
    seconds: float = 10.0,
) -> None:
    """One admitted call of ``seconds`` that ends with ``outcome`` (None: success, a code: that
    status)."""
    failure = rpc_error(outcome) if isinstance(outcome, grpc.StatusCode) else outcome
    try:
        with breaker.admit(seconds):
            if failure is not None:
                raise failure
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass


def state(b: Breaker) -> State:
    """The breaker's state, read anew (not narrowed by an earlier assertion)."""
    return b.state


def breaker(clock: Clock, **kw: object) -> Breaker:
    settings: dict[str, object] = {
        "failure_ratio": 0.5,
        "min_calls": 4,
        "window": 10.0,
        "open_time": 5.0,
        "probes": 1,
        "clock": clock,
        **kw,
    }
    return Breaker("rerank (127.0.0.1:1)", **settings)  # type: ignore[arg-type]


def test_opens_at_the_failure_ratio_once_enough_calls_were_seen() -> None:
    b = breaker(Clock())
    for _ in range(3):
        call(b, C.UNAVAILABLE)
    assert state(b) is State.CLOSED  # 3 failures, but fewer than min_calls
    call(b, C.DEADLINE_EXCEEDED)
    assert state(b) is State.OPEN
    assert b.opened == 1
    with pytest.raises(ServiceError) as refused:
        b.admit()
    assert refused.value.code is C.UNAVAILABLE
    assert "rerank (127.0.0.1:1)" in refused.value.message
    assert ("retry-after", "5") in refused.value.trailing_metadata
    assert b.rejected == 1


def test_answers_that_are_not_failures_keep_it_closed() -> None:
    b = breaker(Clock())
    for code in (C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, None):
        for _ in range(5):
            call(b, code)
    assert state(b) is State.CLOSED
    assert b.counts() == (20, 0)
    for _ in range(19):  # 19 failures of 39 calls: below half
        call(b, C.INTERNAL)
    assert state(b) is State.CLOSED
    call(b, C.UNKNOWN)
    assert state(b) is State.OPEN


def test_cancelled_calls_count_for_nothing() -> None:
    b = breaker(Clock())
    for _ in range(10):
        call(b, asyncio.CancelledError())
    assert b.counts() == (0, 0)


def test_failures_age_out_of_the_window() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        call(b, C.UNAVAILABLE)
    clock.now += 10.5  # a window later: those failures no longer count
    call(b, C.UNAVAILABLE)
    assert state(b) is State.CLOSED
    assert b.counts() == (1, 1)
    clock.now += 4.0  # within the window: all four count
    for _ in range(3):
        call(b, C.UNAVAILABLE)
    assert state(b) is State.OPEN


def open_breaker(clock: Clock, **kw: object) -> Breaker:
    b = breaker(clock, **kw)
    for _ in range(4):
        call(b, C.UNAVAILABLE)
    assert state(b) is State.OPEN
    return b


def test_half_open_lets_one_probe_through_and_a_success_closes_it() -> None:
    clock = Clock()
    b = open_breaker(clock)
    clock.now += 4.9
    with pytest.raises(ServiceError):
        b.admit()
    clock.now += 0.2
    ticket = b.admit()  # the probe
    assert state(b) is State.HALF_OPEN
    with pytest.raises(ServiceError, match="probe"):
        b.admit()  # one probe at a time
    with ticket:
        pass
    assert state(b) is State.CLOSED
    assert b.counts() == (0, 0)
    call(b)


def test_a_failed_probe_opens_it_again() -> None:
    clock = Clock()
    b = open_breaker(clock, probes=2)
    clock.now += 5
    first, second = b.admit(), b.admit()
    with pytest.raises(ServiceError):
        b.admit()
    call_error = rpc_error(C.UNAVAILABLE)
    with pytest.raises(grpc.aio.AioRpcError), first:
        raise call_error
    assert state(b) is State.OPEN
    assert b.opened == 2
    with second:  # a late probe's success after the re-opening still closes it
        pass
    assert state(b) is State.CLOSED


def test_a_cancelled_probe_frees_its_place() -> None:
    clock = Clock()
    b = open_breaker(clock)
    clock.now += 5
    call(b, asyncio.CancelledError())
    assert state(b) is State.HALF_OPEN
    call(b)
    assert state(b) is State.CLOSED


def test_calls_admitted_before_it_opened_do_not_count_after() -> None:
    clock = Clock()
    b = breaker(clock)
    late = b.admit()
    for _ in range(4):
        call(b, C.UNAVAILABLE)
    with late:  # a success that started while closed: the probes decide now
        pass
    assert state(b) is State.OPEN


def test_from_client_config() -> None:
    config = load(
        ClientConfig,
        {"OPEA_CLIENT_BREAKER_MIN_CALLS": "7", "OPEA_CLIENT_BREAKER_OPEN_TIME": "0.5"},
        prefix="OPEA_CLIENT_",
    )
    b = Breaker.of("chat", config)
    assert b is not None
    assert (b.min_calls, b.open_time, b.failure_ratio) == (7, 0.5, 0.5)
    assert Breaker.of("chat", ClientConfig(breaker=False)) is None
    with pytest.raises(ConfigError, match="OPEA_CLIENT_BREAKER_FAILURE_RATIO"):
        ClientConfig(breaker_failure_ratio=0)


def test_short_deadlines_the_caller_chose_do_not_open_it() -> None:
    b = breaker(Clock(), min_deadline=1.0)
    for _ in range(10):
        call(b, C.DEADLINE_EXCEEDED, seconds=0.01)  # a client asked for 10 ms
    assert state(b) is State.CLOSED
    assert b.counts() == (0, 0)
    for _ in range(4):
        call(b, C.DEADLINE_EXCEEDED, seconds=2.0)  # a fair deadline, missed: the downstream
    assert state(b) is State.OPEN
