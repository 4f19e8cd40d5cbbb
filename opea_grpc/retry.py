"""A retry budget: retries stay a bounded fraction of calls.

gRPC's own retries cover calls that fail before the server answered. A call that fails after
the response began (a replica killed mid-reply: "Stream removed") is committed and not retried
by gRPC; the typed clients retry those once more themselves, for idempotent methods only, while
the budget allows. Every call deposits ``ratio`` of a token; a retry spends a whole one; the
bucket starts with ``reserve`` tokens and holds at most ``capacity``. So under sustained failure
retries add at most ``ratio`` extra load, and never more than ``reserve`` in a burst.
"""

from __future__ import annotations


class RetryBudget:
    def __init__(self, *, ratio: float = 0.2, reserve: float = 10.0, capacity: float = 100.0):
        if not 0 < ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        if not 0 <= reserve <= capacity:
            raise ValueError("reserve must be within [0, capacity]")
        self.ratio = ratio
        self.capacity = capacity
        self._tokens = reserve
        self.retries = 0

    def deposit(self) -> None:
        """Record a call."""
        self._tokens = min(self.capacity, self._tokens + self.ratio)

    def withdraw(self) -> bool:
        """Spend a token on a retry; False when the budget is exhausted."""
        if self._tokens < 1:
            return False
        self._tokens -= 1
        self.retries += 1
        return True

    @property
    def tokens(self) -> float:
        return self._tokens
