"""The micro-batcher on its own, with a recording encode function standing in for a model.

Concurrent calls are started with ``asyncio.gather`` so that all of them queue before the
batcher's task runs again: what a pass carries then depends on the queue alone, not on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
import pytest

from opea_grpc.errors import ServiceError
from services.embedding.batcher import Floats, Ints, MicroBatcher


class Recorder:
    """Encodes text ``"t<n>"`` as the vector [n, len] and records every pass and its thread."""

    def __init__(self) -> None:
        self.passes: list[list[str]] = []
        self.threads: set[int] = set()
        self.fail_next = False
        #: While cleared, a pass waits for it (set ``entered`` first).
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, texts: Sequence[str]) -> tuple[Floats, Ints]:
        self.passes.append(list(texts))
        self.threads.add(threading.get_ident())
        self.entered.set()
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise ValueError("model blew up")
        vectors = np.array([[float(t[1:]), len(t)] for t in texts], dtype=np.float32)
        return vectors, np.array([len(t) for t in texts], dtype=np.int64)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def batcher(recorder: Recorder) -> AsyncIterator[MicroBatcher]:
    batcher = MicroBatcher(recorder, max_batch=4, max_queue=40, name="test")
    await batcher.start()
    yield batcher
    await batcher.close()


def texts(start: int, stop: int) -> list[str]:
    return [f"t{n}" for n in range(start, stop)]


def rows(vectors: Floats) -> list[int]:
    return [int(v) for v in vectors[:, 0]]


async def test_concurrent_calls_share_a_pass_and_get_their_own_rows(
    batcher: MicroBatcher, recorder: Recorder
) -> None:
    results = await asyncio.gather(*(batcher.submit([f"t{n}"]) for n in range(4)))
    assert batcher.passes == len(recorder.passes) == 1
    assert [rows(v) for v, _ in results] == [[0], [1], [2], [3]]
    assert [t.tolist() for _, t in results] == [[2], [2], [2], [2]]


async def test_passes_run_off_the_event_loop_on_one_thread(
    batcher: MicroBatcher, recorder: Recorder
) -> None:
    await asyncio.gather(*(batcher.submit(texts(n, n + 3)) for n in range(0, 30, 3)))
    assert threading.get_ident() not in recorder.threads
    assert len(recorder.threads) == 1


async def test_a_pass_takes_at_most_max_batch_texts(
    batcher: MicroBatcher, recorder: Recorder
) -> None:
    vectors, tokens = await batcher.submit(texts(0, 10))
    assert [len(p) for p in recorder.passes] == [4, 4, 2]
    assert rows(vectors) == list(range(10))
    assert tokens.tolist() == [2] * 10


async def test_a_small_call_is_not_held_up_behind_a_bulk_one(
    batcher: MicroBatcher, recorder: Recorder
) -> None:
    bulk = asyncio.ensure_future(batcher.submit(texts(0, 20)))
    small = asyncio.ensure_future(batcher.submit(["t99"]))
    await asyncio.gather(bulk, small)
    # The first pass carries the small call beside a share of the bulk one.
    assert recorder.passes[0] == ["t0", "t1", "t99", "t2"]
    assert rows(bulk.result()[0]) == list(range(20))
    assert len(recorder.passes) == 6  # 21 texts, 4 a pass


async def test_many_callers_take_turns(batcher: MicroBatcher, recorder: Recorder) -> None:
    # Six callers with 4 texts each, room for 4 texts a pass: each pass serves four callers,
    # and the two that got nothing go first in the next pass.
    await asyncio.gather(*(batcher.submit(texts(10 * c, 10 * c + 4)) for c in range(6)))
    first, second = recorder.passes[0], recorder.passes[1]
    assert first == ["t0", "t10", "t20", "t30"]
    assert second[:2] == ["t40", "t50"]


async def test_a_full_queue_is_resource_exhausted(batcher: MicroBatcher) -> None:
    results = await asyncio.gather(
        batcher.submit(texts(0, 38)), batcher.submit(texts(0, 3)), return_exceptions=True
    )
    assert isinstance(results[0], tuple)
    error = results[1]
    assert isinstance(error, ServiceError)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "38 texts are queued and the limit is 40" in error.message
    assert rows((await batcher.submit(texts(0, 3)))[0]) == [0, 1, 2]  # room again once done


async def test_a_failed_pass_fails_its_callers_and_the_batcher_goes_on(
    batcher: MicroBatcher, recorder: Recorder
) -> None:
    recorder.fail_next = True
    results = await asyncio.gather(
        batcher.submit(["t1"]), batcher.submit(["t2"]), return_exceptions=True
    )
    assert [type(r) for r in results] == [ValueError, ValueError]
    assert rows((await batcher.submit(["t3"]))[0]) == [3]
    assert batcher.running


async def test_a_cancelled_call_is_dropped_from_the_queue(
    batcher: MicroBatcher, recorder: Recorder
) -> None:
    doomed = asyncio.ensure_future(batcher.submit(texts(100, 120)))
    kept = asyncio.ensure_future(batcher.submit(["t7"]))
    await asyncio.sleep(0)  # both are queued; the batcher has not taken a pass yet
    doomed.cancel()
    assert rows((await kept)[0]) == [7]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await batcher.submit(["t8"])
    assert recorder.passes == [["t7"], ["t8"]]  # the cancelled texts never reached a pass


async def test_a_call_cancelled_during_a_pass_frees_its_queue_room(
    batcher: MicroBatcher, recorder: Recorder
) -> None:
    recorder.gate.clear()
    first = asyncio.ensure_future(batcher.submit(["t1"]))
    await asyncio.to_thread(recorder.entered.wait, 10)  # the pass is running, held
    doomed = asyncio.ensure_future(batcher.submit(texts(0, 38)))
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    full = asyncio.ensure_future(batcher.submit(texts(0, 40)))  # fits only if room was freed
    await asyncio.sleep(0)
    recorder.gate.set()
    assert rows((await first)[0]) == [1]
    assert rows((await full)[0]) == list(range(40))


async def test_calls_fail_unavailable_when_not_running(recorder: Recorder) -> None:
    batcher = MicroBatcher(recorder, max_batch=4, max_queue=40, name="test")
    with pytest.raises(ServiceError) as info:
        await batcher.submit(["t1"])
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    await batcher.start()
    assert batcher.running
    await batcher.close()
    assert not batcher.running
    with pytest.raises(ServiceError) as info:
        await batcher.submit(["t1"])
    assert "not running" in info.value.message
