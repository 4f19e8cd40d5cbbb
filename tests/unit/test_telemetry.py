"""Trace context flags: what counts as a caller's "not sampled"."""

from __future__ import annotations

import pytest

from opea_grpc import telemetry

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("flags", "unsampled"),
    [("00", True), ("02", True), ("01", False), ("03", False), ("ff", False), ("fe", True)],
)
def test_the_sampled_bit_decides(flags: str, unsampled: bool) -> None:
    metadata = (("x-request-id", "r1"), ("traceparent", f"00-{TRACE}-{SPAN}-{flags}"))
    assert telemetry.unsampled(metadata) is unsampled


def test_no_trace_context_is_not_a_decision() -> None:
    assert telemetry.unsampled(()) is False
    assert telemetry.unsampled(None) is False
    assert telemetry.unsampled((("traceparent", b"00-binary"),)) is False
