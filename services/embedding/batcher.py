"""Micro-batching: concurrent embed calls share forward passes on one worker thread.

Each call queues its texts and waits. One task takes up to ``max_batch`` queued texts, runs
them through ``encode`` in a dedicated thread (never on the event loop), hands each caller its
rows, and meanwhile the next calls queue up: under load, a pass carries whatever arrived while
the previous one ran. A pass gives every waiting call a fair share of its room before filling
the rest in arrival order, so one bulk request does not hold up single queries behind it.

>>> batcher = MicroBatcher(model.encode, max_batch=32, max_queue=16384, name="minilm")
>>> await batcher.start()
>>> vectors, tokens = await batcher.submit(["a text", "another"])
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import numpy.typing as npt

from opea_grpc.errors import ServiceError

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
#: A forward pass: texts in, (vectors (n, dimensions), token count per text) out.
Encode = Callable[[Sequence[str]], tuple[Floats, Ints]]


@dataclass(eq=False)
class _Job:
    texts: Sequence[str]
    future: asyncio.Future[None]
    vectors: Floats | None = None
    tokens: Ints = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    handed: int = 0  # texts given to a pass so far
    finished: int = 0  # texts whose rows have come back

    @property
    def waiting(self) -> int:
        return len(self.texts) - self.handed


@dataclass(frozen=True, slots=True)
class _Slice:
    job: _Job
    start: int
    stop: int


class MicroBatcher:
    """Coalesces concurrent calls into passes of ``encode`` on one dedicated thread."""

    def __init__(self, encode: Encode, *, max_batch: int, max_queue: int, name: str) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self._encode = encode
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.name = name
        #: Passes run so far (each is one call of ``encode``).
        self.passes = 0
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued = 0  # texts not yet given to a pass
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("already started")
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-batcher")

    async def close(self) -> None:
        """Stop taking work; calls still queued fail with UNAVAILABLE."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._fail_all(ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.name} is shutting down"))
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def submit(self, texts: Sequence[str]) -> tuple[Floats, Ints]:
        """The vectors and token counts of ``texts``, once the passes that carry them ran."""
        if not self.running:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.name} is not running")
        if self._queued + len(texts) > self.max_queue:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.name} is busy: {self._queued} texts are queued and the limit is "
                f"{self.max_queue}; retry later or send fewer texts per request",
            )
        job = _Job(texts, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._queued += len(texts)
        self._wake.set()
        try:
            await job.future
        except asyncio.CancelledError:  # the caller went away: its texts need no pass
            if job in self._jobs:
                self._jobs.remove(job)
                self._queued -= job.waiting
            raise
        if job.vectors is None:
            raise RuntimeError("batch finished without vectors")
        return job.vectors, job.tokens

    def _take(self) -> list[_Slice]:
        """The next pass: a fair share of the room for every waiting job, then arrival order."""
        for job in [j for j in self._jobs if j.future.done()]:
            self._jobs.remove(job)
            self._queued -= job.waiting
        jobs = list(self._jobs)
        room = self.max_batch
        taken: list[_Slice] = []
        share = max(1, room // max(1, len(jobs)))
        for limit in (share, room):
            for job in jobs:
                n = min(limit, room, job.waiting)
                if n > 0:
                    taken.append(_Slice(job, job.handed, job.handed + n))
                    job.handed += n
                    room -= n
        self._queued -= self.max_batch - room
        # Jobs served in this pass go behind those that were not (round robin across passes).
        served = {id(s.job) for s in taken}
        rest = [j for j in jobs if id(j) not in served]
        again = [j for j in jobs if id(j) in served and j.waiting > 0]
        self._jobs = collections.deque(rest + again)
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._jobs:
                    taken = self._take()
                    if not taken:
                        continue
                    texts = [t for s in taken for t in s.job.texts[s.start : s.stop]]
                    self.passes += 1
                    try:
                        vectors, tokens = await loop.run_in_executor(
                            self._executor, self._encode, texts
                        )
                    except Exception as exc:  # every caller in the pass gets it (and logs it)
                        for s in taken:
                            if not s.job.future.done():
                                s.job.future.set_exception(exc)
                        continue
                    self._deliver(taken, vectors, tokens)
        finally:
            self._fail_all(ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.name} stopped"))

    @staticmethod
    def _deliver(taken: list[_Slice], vectors: Floats, tokens: Ints) -> None:
        offset = 0
        for s in taken:
            n = s.stop - s.start
            job = s.job
            if not job.future.done():
                if job.vectors is None:
                    job.vectors = np.empty((len(job.texts), vectors.shape[1]), dtype=np.float32)
                    job.tokens = np.zeros(len(job.texts), dtype=np.int64)
                job.vectors[s.start : s.stop] = vectors[offset : offset + n]
                job.tokens[s.start : s.stop] = tokens[offset : offset + n]
                job.finished += n
                if job.finished == len(job.texts):
                    job.future.set_result(None)
            offset += n

    def _fail_all(self, error: ServiceError) -> None:
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(error)
        self._jobs.clear()
        self._queued = 0
