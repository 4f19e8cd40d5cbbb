"""Token buckets per key: requests and model tokens a minute, and the retry time they report."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway.limits import Limiter
from opea_grpc.errors import ServiceError


def retry_delay(error: ServiceError) -> float:
    details = dict(error.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


def test_requests_per_minute_refill_evenly() -> None:
    now = [0.0]
    limiter = Limiter(requests_per_minute=2, tokens_per_minute=0, clock=lambda: now[0])
    limiter.admit("a")
    limiter.admit("a")
    with pytest.raises(ServiceError) as refused:
        limiter.admit("a")
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(refused.value) == pytest.approx(30.0)
    assert dict(refused.value.trailing_metadata)["retry-after"] == "30"
    limiter.admit("b")  # another key has its own budget
    now[0] = 30.0
    limiter.admit("a")  # half a minute refilled one request


def test_a_large_answer_overdraws_the_token_budget() -> None:
    now = [0.0]
    limiter = Limiter(requests_per_minute=0, tokens_per_minute=600, clock=lambda: now[0])
    limiter.admit("a")
    limiter.charge("a", 1200)  # twice the minute's budget
    with pytest.raises(ServiceError) as refused:
        limiter.admit("a")
    assert retry_delay(refused.value) == pytest.approx(60.1, abs=0.01)  # back to one token
    now[0] = 61.0
    limiter.admit("a")
