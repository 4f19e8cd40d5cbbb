"""The pipeline of a megaservice: a DAG of typed calls, run with deadlines, timings, degradation.

A :class:`~opea_grpc.node.Node` wraps one call of a typed client (``call(request, *, timeout)``).
The :class:`ServiceOrchestrator` checks each edge as it is added, then runs the graph once per
request: a node starts as soon as all its predecessors are done and gets the smaller of its own
timeout and what the run has left. Graph algorithms live in :mod:`opea_grpc.graph`; everything a
request owns lives in its run (:class:`~opea_grpc.run.Run`), so one orchestrator serves any number
of concurrent requests.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar

from opea_grpc import graph
from opea_grpc.errors import GraphError
from opea_grpc.node import BUILTIN_ADAPTERS, Node, NodeTiming, RunResult, type_name
from opea_grpc.run import Plan, Run, StreamRun

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

S = TypeVar("S")
A = TypeVar("A")
B = TypeVar("B")


@dataclass(frozen=True)
class _Edge:
    adapter: Callable[[Any], Any] | None  # None: the output is the request as it is
    label: str | None  # what describe() shows


class ServiceOrchestrator(Generic[S]):
    """A DAG of nodes, checked as it is built, run once per request with one state ``S``.

    >>> pipeline: ServiceOrchestrator[Ask] = (
    ...     ServiceOrchestrator()
    ...     .add(Node("embed", embeddings.embed, timeout=2.0))
    ...     .add(Node("search", retrieval.search))
    ...     .add(Node("chat", chat.chat, stream=chat.chat_stream, prepare=ground))
    ...     .flow_to("embed", "search")  # built-in adapter: EmbedResponse -> SearchRequest
    ...     .flow_to("search", "chat")
    ... )
    >>> result = await pipeline.run(EmbedRequest(input=[q]), state=Ask(q), timeout=5.0)
    >>> async with pipeline.stream(EmbedRequest(input=[q]), state=Ask(q), timeout=5.0) as run:
    ...     async for chunk in run: ...
    """

    def __init__(self) -> None:
        self._nodes: dict[str, Node[S, Any, Any]] = {}
        self._edges: dict[graph.Edge, _Edge] = {}
        self._plan: Plan | None = None
        self._observer: Callable[[NodeTiming], None] | None = None

    def add(self, node: Node[S, Any, Any]) -> Self:
        if node.name in self._nodes:
            raise GraphError(f"a node named {node.name!r} was already added")
        self._nodes[node.name] = node
        self._plan = None
        return self

    def flow_to(
        self,
        a: str | Node[S, Any, A],
        b: str | Node[S, B, Any],
        *,
        adapter: Callable[[A], B] | None = None,
    ) -> Self:
        """Feed ``a``'s output to ``b``: as it is, through ``adapter`` or a built-in adapter, or
        into ``b``'s prepare hook. Refuses, with a message that says why, an edge that cannot."""
        src, dst = self._known(a), self._known(b)
        edge = f"the edge {src.name} -> {dst.name}"
        if (src.name, dst.name) in self._edges:
            raise GraphError(f"{edge} was already added")
        cycle = graph.cycle_if_added(self._edges, (src.name, dst.name))
        if cycle is not None:
            raise GraphError(f"{edge} closes a cycle: {graph.format_path(cycle)}")
        fed_by = [x for x, y in self._edges if y == dst.name]
        if dst.prepare is None and fed_by:
            raise GraphError(
                f"node {dst.name!r} would be fed by {', '.join([*fed_by, src.name])}: a node with"
                " several predecessors needs a prepare hook to merge their outputs"
            )
        if dst.prepare is None and src.optional:
            raise GraphError(
                f"node {dst.name!r} follows optional node {src.name!r}, which may be absent when"
                f" {dst.name!r} runs: give {dst.name!r} a prepare hook"
            )
        self._edges[src.name, dst.name] = _edge(src, dst, adapter)
        self._plan = None
        return self

    def _known(self, ref: str | Node[S, Any, Any]) -> Node[S, Any, Any]:
        name = ref if isinstance(ref, str) else ref.name
        node = self._nodes.get(name)
        if node is None:
            known = ", ".join(self._nodes) or "none yet"
            raise GraphError(f"unknown node {name!r}: add() it first (known nodes: {known})")
        if not isinstance(ref, str) and ref is not node:
            raise GraphError(f"a different node named {name!r} was added")
        return node

    def observe(self, observer: Callable[[NodeTiming], None] | None) -> Self:
        """Call ``observer`` with each node's timing as it ends, in every run (for metrics: it
        sees failures and cancellations that never reach a result)."""
        self._observer, self._plan = observer, None
        return self

    def validate(self) -> None:
        """Check the whole graph (edges were checked by flow_to); runs do this lazily."""
        self._compiled()

    def _compiled(self) -> Plan:
        if self._plan is None:
            if not self._nodes:
                raise GraphError("the graph has no nodes: add() some first")
            names, edges = list(self._nodes), list(self._edges)
            before = graph.predecessors(names, edges)
            after = graph.successors(names, edges)
            sources = graph.sources(names, edges)
            self._plan = Plan(
                nodes=dict(self._nodes),
                before=before,
                after=after,
                sources=sources,
                sinks=graph.sinks(names, edges),
                adapters={b: e.adapter for (_, b), e in self._edges.items() if len(before[b]) == 1},
                observer=self._observer,
                chain=len(sources) == 1 and all(len(a) <= 1 for a in after.values()),
            )
        return self._plan

    def describe(self, fmt: Literal["json", "mermaid"] = "json") -> str:
        """The graph as JSON ``{"nodes": [...], "edges": [...]}`` or a mermaid flowchart."""
        nodes = [self._nodes[n] for n in graph.topological_order(list(self._nodes), self._edges)]
        if fmt == "mermaid":
            return graph.render_mermaid(
                [n.name for n in nodes],
                self._edges,
                labels={n.name: _label(n) for n in nodes},
                dashed={n.name for n in nodes if n.optional},
                edge_labels={k: e.label for k, e in self._edges.items() if e.label is not None},
            )
        listed = [
            {
                "name": n.name,
                "input": type_name(n.input_type),
                "output": type_name(n.output_type),
                "timeout": n.timeout,
                "optional": n.optional,
                "streams": n.stream is not None,
            }
            for n in nodes
        ]
        edges = [{"from": a, "to": b, "adapter": e.label} for (a, b), e in self._edges.items()]
        return json.dumps({"nodes": listed, "edges": edges}, indent=2)

    async def run(self, request: object, *, state: S, timeout: float) -> RunResult[S]:
        """Run every node once; raise :class:`NodeError` when a required node fails."""
        run = Run(self._compiled(), request, state, timeout, held=None)
        await run.execute()
        return RunResult(MappingProxyType(run.outputs), state, run.timings(), run.degraded)

    def stream(self, request: object, *, state: S, timeout: float) -> StreamRun[S]:
        """Run the graph and stream its one sink; nothing starts before iteration does."""
        plan = self._compiled()
        if len(plan.sinks) != 1:
            raise GraphError(f"a streamed graph needs one sink node, not {', '.join(plan.sinks)}")
        sink = plan.nodes[plan.sinks[0]]
        if sink.stream is None:
            raise GraphError(f"the sink node {sink.name!r} cannot stream: give it stream=")
        return StreamRun(Run(plan, request, state, timeout, held=sink.name), sink)


def _edge(src: Node[Any, Any, Any], dst: Node[Any, Any, Any], adapter: Any) -> _Edge:
    if dst.prepare is not None:
        if adapter is not None:
            raise GraphError(
                f"node {dst.name!r} has a prepare hook, which would ignore the adapter"
            )
        return _Edge(None, "prepare")
    if adapter is not None:
        return _Edge(adapter, getattr(adapter, "__qualname__", repr(adapter)))
    if issubclass(src.output_type, dst.input_type):
        return _Edge(None, None)
    builtin = BUILTIN_ADAPTERS.get((src.output_type, dst.input_type))
    if builtin is not None:
        return _Edge(builtin, builtin.__name__)
    raise GraphError(
        f"{src.name!r} returns {type_name(src.output_type)}, which cannot feed {dst.name!r}"
        f" (takes {type_name(dst.input_type)}), and no built-in adapter converts it:"
        f" pass flow_to(..., adapter=) or give {dst.name!r} a prepare hook"
    )


def _label(node: Node[Any, Any, Any]) -> str:
    kind = " (optional)" if node.optional else ""
    streams = " (streams)" if node.stream else ""
    return f"{node.name}{kind}\n{node.input_type.__name__} → {node.output_type.__name__}{streams}"
