"""A steady, bounded load for fault tests, and its tally: sent, failed, p99 while the fault lasted.

>>> tally = await drive(send, requests=400, concurrency=8, fault=kill, fault_after=100)
>>> print(tally.report("SIGKILL embedding replica"))
>>> assert tally.failures == []

``send(i)`` makes request number ``i`` and raises when it did not get a right answer. Figures are
printed, never asserted: tests assert on outcomes only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

Send = Callable[[int], Awaitable[object]]


@dataclass
class Tally:
    """What a load saw: each request's start and duration, and what failed."""

    started: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: When the fault began (``time.perf_counter()``); None: no fault.
    fault_at: float | None = None

    @property
    def sent(self) -> int:
        return len(self.seconds)

    def during_fault(self) -> list[float]:
        """Durations of the requests that started once the fault began."""
        if self.fault_at is None:
            return list(self.seconds)
        at = self.fault_at
        return [s for t, s in zip(self.started, self.seconds, strict=True) if t >= at]

    def report(self, what: str) -> str:
        during = self.during_fault()
        line = (
            f"{what}: sent {self.sent}, failed {len(self.failures)}, "
            f"p99 during the fault {percentile(during, 99) * 1000:.1f} ms "
            f"over {len(during)} requests (p50 {percentile(during, 50) * 1000:.1f} ms)"
        )
        if self.failures:
            line += f"; first failures: {self.failures[:3]}"
        return line


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


async def drive(
    send: Send,
    *,
    requests: int,
    concurrency: int,
    fault: Callable[[], Awaitable[object]] | None = None,
    fault_after: int = 0,
) -> Tally:
    """Send ``requests`` requests, ``concurrency`` at a time; once ``fault_after`` of them have
    ended, run ``fault()`` alongside (it must end; the load waits for it)."""
    tally = Tally()
    issued = 0
    ended = 0
    faulted: asyncio.Task[object] | None = None

    async def start_fault() -> object:
        tally.fault_at = time.perf_counter()
        assert fault is not None
        return await fault()

    async def worker() -> None:
        nonlocal issued, ended, faulted
        while issued < requests:
            number = issued
            issued += 1
            began = time.perf_counter()
            try:
                await send(number)
            except Exception as exc:  # every failure is tallied with what it was
                tally.failures.append(f"#{number}: {type(exc).__name__}: {exc}"[:500])
            tally.started.append(began)
            tally.seconds.append(time.perf_counter() - began)
            ended += 1
            if fault is not None and faulted is None and ended >= fault_after:
                faulted = asyncio.create_task(start_fault())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if faulted is not None:
        await faulted
    return tally


QUESTION = {
    "model": "trivial-chat",
    "messages": [{"role": "user", "content": "How does a balancer pick a replica?"}],
}


def asker(http: httpx.AsyncClient, *, stream_every: int = 0) -> Send:
    """``send`` for the gateway's chat completions: an answer with text (every ``stream_every``-th
    request streamed, ending with [DONE]), else it raises."""

    async def ask(number: int) -> None:
        if stream_every and number % stream_every == 0:
            await ask_streamed(http)
            return
        reply = await http.post("/v1/chat/completions", json=QUESTION)
        if reply.status_code != 200:
            raise AssertionError(f"HTTP {reply.status_code}: {reply.text[:300]}")
        if not reply.json()["choices"][0]["message"]["content"]:
            raise AssertionError("an answer without text")

    return ask


async def ask_streamed(http: httpx.AsyncClient) -> None:
    body = {**QUESTION, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise AssertionError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        frames = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
    if not frames or frames[-1] != "data: [DONE]":
        raise AssertionError(f"the stream did not end with [DONE]: {frames[-2:]}")
    errors = [frame for frame in frames if frame.startswith('data: {"error"')]
    if errors:
        raise AssertionError(f"an error event: {errors[0][:300]}")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, timeout: float = 20.0, every: float = 0.05
) -> bool:
    """Whether ``check()`` comes true within ``timeout`` seconds (asked every ``every`` s)."""
    end = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result or time.monotonic() > end:
            return result
        await asyncio.sleep(every)
