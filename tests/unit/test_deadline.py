from __future__ import annotations

from opea_grpc import deadline


def test_no_deadline_leaves_timeout() -> None:
    assert deadline.remaining() is None
    assert deadline.bound(7.0) == 7.0


def test_scope_bounds_and_nests() -> None:
    with deadline.scope(2.0):
        assert deadline.bound(60.0) < 2.0
        assert deadline.bound(0.5) == 0.5
        with deadline.scope(30.0):  # an inner scope cannot extend the outer deadline
            left = deadline.remaining()
            assert left is not None
            assert left <= 2.0
    assert deadline.remaining() is None


def test_expired_deadline_bounds_to_zero() -> None:
    with deadline.scope(0.0):
        assert deadline.bound(5.0) == 0.0
