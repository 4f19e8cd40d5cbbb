"""One execution of a pipeline graph: per-request state, scheduling, deadlines and timings.

:class:`ServiceOrchestrator <opea_grpc.orchestrator.ServiceOrchestrator>` compiles its graph into a
:class:`Plan`, immutable and shared by every run; each request gets a :class:`Run` of its own, so
one orchestrator serves any number of concurrent requests. :class:`StreamRun` is the run of a graph
whose sink streams.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from opea_grpc import deadline, telemetry
from opea_grpc.cache import bypass
from opea_grpc.errors import GraphError, NodeError, ServiceError, status_of
from opea_grpc.node import (
    BUILTIN_ADAPTERS,
    REQUEST,
    Node,
    NodeStatus,
    NodeTiming,
    StreamCall,
    type_name,
)

if typing.TYPE_CHECKING:
    from opentelemetry.trace import Tracer

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

_log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")

_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
_NO_TIME = "no time left before the run's deadline"


@dataclass(frozen=True)
class Plan:
    """The graph compiled for running: immutable, shared by every run."""

    nodes: Mapping[str, Node[Any, Any, Any]]
    before: Mapping[str, tuple[str, ...]]
    after: Mapping[str, tuple[str, ...]]
    sources: tuple[str, ...]
    sinks: tuple[str, ...]
    adapters: Mapping[str, Callable[[Any], Any] | None]  # into each single-predecessor node
    #: Told of every node of every run as it ends (metrics): ok, failed, timed out or skipped.
    observer: Callable[[NodeTiming], None] | None = None
    #: One source and no node with two successors: a run is one sequence of calls, made in the
    #: caller's own task (no task, future or wake-up of its own).
    chain: bool = False


if sys.version_info >= (3, 11):

    async def _bounded(awaitable: Awaitable[T], seconds: float) -> T:
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover

    async def _bounded(awaitable: Awaitable[T], seconds: float) -> T:
        try:
            return await asyncio.wait_for(awaitable, seconds)
        except asyncio.TimeoutError:
            # Before 3.11 asyncio's TimeoutError is not the builtin one, which callers catch.
            raise TimeoutError from None


def _ended(error: BaseException) -> tuple[NodeStatus, grpc.StatusCode, str]:
    if isinstance(error, asyncio.CancelledError):
        return NodeStatus.FAILED, grpc.StatusCode.CANCELLED, "cancelled"
    code, message = status_of(error)
    return (NodeStatus.TIMED_OUT if code is _DEADLINE else NodeStatus.FAILED), code, message


class Run:
    """One execution of a plan: all the per-request state, and the scheduling.

    A node that finishes starts the successors it was the last to wait for: the first goes on in
    the same task, each other one in a task of its own. Parallel branches thus run concurrently,
    and a plan that is a chain runs in the caller's task; nothing polls.
    """

    def __init__(
        self, plan: Plan, request: object, state: object, timeout: float, held: str | None
    ) -> None:
        self.plan, self.request, self.state, self.held = plan, request, state, held
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + timeout
        self.outputs: dict[str, object] = {}
        self.started: dict[str, float] = {}
        self.finished: dict[str, NodeTiming] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiting = {name: len(before) for name, before in plan.before.items()}
        self.degraded = self.closing = False
        self.done: asyncio.Future[None] | None = None
        self.failure: NodeError | None = None

    async def execute(self) -> None:
        """Run every node but the held one (a streamed sink); return when all have ended."""
        request = self.request
        for name in self.plan.sources:
            node = self.plan.nodes[name]
            if not (
                node.prepare
                or isinstance(request, node.input_type)
                or (type(request), node.input_type) in BUILTIN_ADAPTERS
            ):
                raise GraphError(
                    f"the request ({type(request).__qualname__}) cannot feed source node"
                    f" {name!r} (takes {type_name(node.input_type)})"
                )
        if self.plan.chain:
            await self._inline(self.plan.sources[0])
            return
        self.done = asyncio.get_running_loop().create_future()
        for name in self.plan.sources:
            if name != self.held:
                self._spawn(name)
        try:
            if self.tasks:
                await self.done
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        """Cancel every node in flight and wait until each has ended (no orphan tasks)."""
        self.closing = True
        self._settle(None)
        if self.tasks:
            tasks = list(self.tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)

    async def _inline(self, source: str) -> None:
        """Run a chain in this task; raise the first required node's failure. A cancellation
        of this task stops it, as :meth:`cancel` stops the tasks of a branching plan."""
        if source == self.held:
            return
        self.started[source] = time.perf_counter()
        name: str | None = source
        try:
            while name is not None:
                name = await self._step(name)
        finally:
            self.closing = True
        if self.failure is not None:
            raise self.failure

    def _settle(self, failure: NodeError | None) -> None:
        if failure is not None and self.failure is None:
            self.failure = failure
        if self.done is None or self.done.done():
            return
        if failure is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(failure)

    def _spawn(self, name: str) -> None:
        self.started[name] = time.perf_counter()
        self.tasks.add(asyncio.create_task(self._drive(name)))

    async def _drive(self, name: str | None) -> None:
        try:
            while name is not None:
                name = await self._step(name)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self.tasks.discard(task)
            if not self.tasks:
                self._settle(None)

    async def _step(self, name: str) -> str | None:
        """Run one node; return the successor to run next in this task, if any."""
        node = self.plan.nodes[name]
        try:
            reply = await (self._call(node) if telemetry.tracer is None else self._traced(node))
        except (Exception, asyncio.CancelledError) as error:
            # Cancelled: the run is stopping (a branching plan's tasks), or the caller's task
            # itself was (a chain runs in it).
            stopped = isinstance(error, asyncio.CancelledError) and (
                self.closing or self.plan.chain
            )
            status, code, message = (
                (NodeStatus.SKIPPED, grpc.StatusCode.CANCELLED, "cancelled: the run stopped")
                if stopped
                else _ended(error)
            )
            self.record(name, status, message)
            if stopped:
                raise
            if self.closing:
                return None
            if not node.optional:
                failure = NodeError(name, code, message)
                failure.__cause__ = error
                self.closing = True
                self._settle(failure)
                return None
            if code is grpc.StatusCode.INTERNAL and not isinstance(error, ServiceError):
                _log.warning("optional node %r failed", name, exc_info=error)
            self.degraded = True
        else:
            self.outputs[name] = reply
            self.record(name, NodeStatus.OK, "")
            if self.closing:
                return None
        following = None
        for after in self.plan.after[name]:
            self.waiting[after] -= 1
            if self.waiting[after] or after == self.held:
                continue
            if following is None:
                following = after
                self.started[after] = time.perf_counter()
            else:
                self._spawn(after)
        return following

    async def _traced(self, node: Node[Any, Any, Any]) -> object:
        """:meth:`_call` inside a span of its own (tracing on): the node's gRPC call nests in it."""
        if not telemetry.recording():  # an unsampled request: no span, no cost
            return await self._call(node)
        tracer = typing.cast("Tracer", telemetry.tracer)
        with tracer.start_as_current_span(
            f"node {node.name}", attributes={"opea.node": node.name, "opea.optional": node.optional}
        ):
            return await self._call(node)

    async def _call(self, node: Node[Any, Any, Any]) -> object:
        request = self.request_for(node)
        seconds = min(node.timeout, self.deadline - time.perf_counter())
        if seconds <= 0:
            raise ServiceError(_DEADLINE, _NO_TIME)
        cache = None if node.cache is None or bypass.get() else node.cache
        key = b""
        if cache is not None:
            message = typing.cast(Message, request)
            key = b"%s\0%s" % (node.name.encode(), message.SerializeToString(deterministic=True))
            hit = await cache.get(key)
            if hit is not None:
                reply = node.output_type.FromString(hit)
                if node.absorb is not None:
                    node.absorb(self.state, reply)
                return reply
        try:
            # The scope also bounds calls a node makes itself (a local function calling gRPC).
            with deadline.scope(seconds):
                call = node.call(request, timeout=seconds)
                reply = await (call if node.self_bounded else _bounded(call, seconds))
        except TimeoutError:
            raise ServiceError(_DEADLINE, f"no reply within {seconds:.3g} s") from None
        if cache is not None:
            await cache.put(key, reply.SerializeToString())
        if node.absorb is not None:
            node.absorb(self.state, reply)
        return reply

    def request_for(self, node: Node[Any, Any, Any]) -> object:
        before = self.plan.before[node.name]
        if node.prepare is not None:
            if not before:
                return node.prepare(self.state, {REQUEST: self.request})
            return node.prepare(
                self.state, {p: self.outputs[p] for p in before if p in self.outputs}
            )
        if not before:
            if isinstance(self.request, node.input_type):
                return self.request
            return BUILTIN_ADAPTERS[type(self.request), node.input_type](self.request)
        adapter, value = self.plan.adapters[node.name], self.outputs[before[0]]
        return value if adapter is None else adapter(value)

    def record(self, name: str, status: NodeStatus, message: str) -> None:
        began = self.started[name]
        timing = self.finished[name] = NodeTiming(
            name, status, began - self.t0, time.perf_counter() - began, message
        )
        if self.plan.observer is not None:
            self.plan.observer(timing)

    def timings(self) -> tuple[NodeTiming, ...]:
        return tuple(self.finished[name] for name in self.started if name in self.finished)


class StreamRun(Generic[S]):
    """A run whose sink streams: ``async for chunk in run`` yields the sink's chunks.

    The graph starts on the first ``__anext__``; an upstream failure raises :class:`NodeError`
    there, before any chunk. ``timings``, ``outputs`` (every node but the sink), ``degraded`` and
    ``state`` are complete once iteration ends. Leaving ``async with``, or :meth:`aclose`, cancels
    whatever is in flight and closes the sink's stream: use one of them if you may stop early.
    """

    def __init__(self, run: Run, sink: Node[Any, Any, Any]) -> None:
        self._run, self._sink = run, sink
        self._chunks: AsyncIterator[Any] | None = None
        self._until = 0.0
        self._closed = False
        self._span: _StreamSpan | None = None

    @property
    def timings(self) -> tuple[NodeTiming, ...]:
        return self._run.timings()

    @property
    def outputs(self) -> Mapping[str, object]:
        return MappingProxyType(self._run.outputs)

    @property
    def degraded(self) -> bool:
        return self._run.degraded

    @property
    def state(self) -> S:
        return typing.cast(S, self._run.state)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._chunks is None:
            if self._closed:
                raise StopAsyncIteration
            await self._open()
        chunks = typing.cast(AsyncIterator[Any], self._chunks)
        try:
            left = self._until - time.perf_counter()
            if left <= 0:
                raise ServiceError(_DEADLINE, _NO_TIME)
            if self._span is not None:
                return await self._span.next(chunks, None if self._sink.self_bounded else left)
            if self._sink.self_bounded:  # the stream's own deadline ends it in time
                return await chunks.__anext__()
            return await _bounded(chunks.__anext__(), left)
        except StopAsyncIteration:
            await self._end(NodeStatus.OK, "")
            raise
        except asyncio.CancelledError:
            await self._end(NodeStatus.SKIPPED, "cancelled")
            raise
        except Exception as error:
            status, code, message = _ended(error)
            if isinstance(error, TimeoutError):
                message = "the stream did not end before the deadline"
            await self._end(status, message)
            raise NodeError(self._sink.name, code, message) from error

    async def _open(self) -> None:
        run, sink = self._run, self._sink
        try:
            await run.execute()
        except BaseException:
            self._closed = True
            raise
        if self._closed:  # aclose() was called while the graph ran
            raise StopAsyncIteration
        now = run.started[sink.name] = time.perf_counter()
        seconds = min(sink.timeout, run.deadline - now)
        if telemetry.tracer is not None and telemetry.recording():
            self._span = _StreamSpan(telemetry.tracer, sink.name)
        try:
            if seconds <= 0:
                raise ServiceError(_DEADLINE, _NO_TIME)
            self._chunks = typing.cast(StreamCall[Any, Any], sink.stream)(
                run.request_for(sink), timeout=seconds
            )
        except Exception as error:
            status, code, message = _ended(error)
            await self._end(status, message)
            raise NodeError(sink.name, code, message) from error
        self._until = now + seconds

    async def _end(self, status: NodeStatus, message: str) -> None:
        """Record the sink's timing and close its stream (a no-op for one that has ended)."""
        chunks, self._chunks, self._closed = self._chunks, None, True
        self._run.record(self._sink.name, status, message)
        if self._span is not None:
            self._span.end(status, message)
            self._span = None
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()

    async def aclose(self) -> None:
        """Cancel the nodes in flight and close the sink's stream; safe to call twice."""
        self._closed = True
        await self._run.cancel()
        if self._chunks is not None:
            await self._end(NodeStatus.SKIPPED, "closed by the consumer before the stream ended")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _StreamSpan:
    """The span of a streamed sink (tracing on): current while each chunk is awaited, so the
    stream's gRPC call nests in it; records the time to the first chunk and the chunk count."""

    def __init__(self, tracer: Tracer, name: str) -> None:
        from opentelemetry import trace

        self.span = tracer.start_span(f"node {name}", attributes={"opea.node": name})
        self.context = trace.set_span_in_context(self.span)
        self.began = time.perf_counter()
        self.chunks = 0

    async def next(self, chunks: AsyncIterator[Any], seconds: float | None) -> Any:
        from opentelemetry import context

        token = context.attach(self.context)
        try:
            step = chunks.__anext__()
            chunk = await (step if seconds is None else _bounded(step, seconds))
        finally:
            context.detach(token)
        if not self.chunks:
            first = (time.perf_counter() - self.began) * 1000
            self.span.set_attribute("opea.stream.time_to_first_chunk_ms", round(first, 3))
        self.chunks += 1
        return chunk

    def end(self, status: NodeStatus, message: str) -> None:
        from opentelemetry import trace

        self.span.set_attribute("opea.stream.chunks", self.chunks)
        if status is not NodeStatus.OK:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, message or status.name))
        self.span.end()
