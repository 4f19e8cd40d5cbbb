"""Pure functions over a directed graph given as node names and ``(from, to)`` edges.

Nothing here knows about nodes' types, calls or runs: the orchestrator keeps its graph as plain
data and asks these functions about it, so each can be tested on its own.

>>> edges = [("embed", "search"), ("search", "chat")]
>>> topological_order(["chat", "embed", "search"], edges)
('embed', 'search', 'chat')
>>> cycle_if_added(edges, ("chat", "embed"))
('chat', 'embed', 'search', 'chat')
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping, Sequence

from opea_grpc.errors import GraphError

Edge = tuple[str, str]


def predecessors(nodes: Iterable[str], edges: Iterable[Edge]) -> dict[str, tuple[str, ...]]:
    """Each node's predecessors, in edge order (every node is a key, possibly with none)."""
    found: dict[str, list[str]] = {name: [] for name in nodes}
    for a, b in edges:
        found[b].append(a)
    return {name: tuple(before) for name, before in found.items()}


def successors(nodes: Iterable[str], edges: Iterable[Edge]) -> dict[str, tuple[str, ...]]:
    """Each node's successors, in edge order (every node is a key, possibly with none)."""
    found: dict[str, list[str]] = {name: [] for name in nodes}
    for a, b in edges:
        found[a].append(b)
    return {name: tuple(after) for name, after in found.items()}


def sources(nodes: Iterable[str], edges: Iterable[Edge]) -> tuple[str, ...]:
    """The nodes no edge leads to, in node order."""
    targets = {b for _, b in edges}
    return tuple(name for name in nodes if name not in targets)


def sinks(nodes: Iterable[str], edges: Iterable[Edge]) -> tuple[str, ...]:
    """The nodes no edge leaves, in node order."""
    origins = {a for a, _ in edges}
    return tuple(name for name in nodes if name not in origins)


def find_path(edges: Iterable[Edge], start: str, goal: str) -> tuple[str, ...] | None:
    """A path ``(start, ..., goal)`` following the edges, or None when there is none."""
    after: dict[str, list[str]] = {}
    for a, b in edges:
        after.setdefault(a, []).append(b)
    came_from: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        here = frontier.pop()
        if here == goal:
            path = [here]
            while path[-1] != start:
                path.append(came_from[path[-1]])
            return tuple(reversed(path))
        for there in after.get(here, ()):
            if there not in seen:
                seen.add(there)
                came_from[there] = here
                frontier.append(there)
    return None


def cycle_if_added(edges: Iterable[Edge], edge: Edge) -> tuple[str, ...] | None:
    """The cycle ``(a, b, ..., a)`` that adding ``edge`` = (a, b) would close, or None."""
    a, b = edge
    back = find_path(edges, b, a)
    return None if back is None else (a, *back)


def find_cycle(nodes: Iterable[str], edges: Iterable[Edge]) -> tuple[str, ...] | None:
    """Some cycle ``(x, ..., x)`` of the graph, or None when it is acyclic."""
    edge_list = list(edges)
    after = successors(nodes, edge_list)
    done: set[str] = set()
    for root in after:
        if root in done:
            continue
        # Iterative depth-first search; `trail` is the current path from root.
        trail: list[str] = [root]
        on_trail = {root}
        stack = [iter(after[root])]
        while stack:
            step = next(stack[-1], None)
            if step is None:
                stack.pop()
                finished = trail.pop()
                on_trail.discard(finished)
                done.add(finished)
                continue
            if step in on_trail:
                return (*trail[trail.index(step) :], step)
            if step not in done:
                trail.append(step)
                on_trail.add(step)
                stack.append(iter(after[step]))
    return None


def topological_order(nodes: Sequence[str], edges: Iterable[Edge]) -> tuple[str, ...]:
    """The nodes ordered so that every edge goes forward; among ready nodes, node order wins.

    Raises :class:`GraphError` naming a cycle when there is no such order.
    """
    edge_list = list(edges)
    after = successors(nodes, edge_list)
    waiting = {name: len(before) for name, before in predecessors(nodes, edge_list).items()}
    index = {name: position for position, name in enumerate(nodes)}
    ready = [(index[name], name) for name in nodes if waiting[name] == 0]
    order: list[str] = []
    while ready:
        _, here = heapq.heappop(ready)
        order.append(here)
        for there in after[here]:
            waiting[there] -= 1
            if waiting[there] == 0:
                heapq.heappush(ready, (index[there], there))
    if len(order) < len(nodes):
        cycle = find_cycle(nodes, edge_list) or ()
        raise GraphError(f"the graph has a cycle: {format_path(cycle)}")
    return tuple(order)


def format_path(path: Iterable[str]) -> str:
    """``"a -> b -> c"``."""
    return " -> ".join(path)


def render_mermaid(
    nodes: Sequence[str],
    edges: Iterable[Edge],
    *,
    labels: Mapping[str, str] | None = None,
    dashed: Collection[str] = (),
    edge_labels: Mapping[Edge, str] | None = None,
) -> str:
    """A mermaid ``flowchart LR`` of the graph.

    Nodes get the ids ``n0``, ``n1`` ... in ``nodes`` order (names are free text, ids are not);
    ``labels`` replaces a node's displayed name; nodes in ``dashed`` and the edges leaving them are
    drawn dashed; ``edge_labels`` writes text on edges.
    """
    ids = {name: f"n{index}" for index, name in enumerate(nodes)}
    label_of = labels or {}
    edge_label_of = edge_labels or {}
    lines = ["flowchart LR"]
    for name in nodes:
        lines.append(f'    {ids[name]}["{_escape(label_of.get(name, name))}"]')
    for a, b in edges:
        arrow = "-.->" if a in dashed else "-->"
        text = edge_label_of.get((a, b))
        tag = "" if text is None else f'|"{_escape(text)}"|'
        lines.append(f"    {ids[a]} {arrow}{tag} {ids[b]}")
    marked = [ids[name] for name in nodes if name in dashed]
    if marked:
        lines.append("    classDef optional stroke-dasharray: 5 5")
        lines.append(f"    class {','.join(marked)} optional")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    """Text made safe inside a quoted mermaid label (entity codes, as mermaid expects)."""
    for raw, code in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(raw, code)
    return text.replace("\n", "<br/>")
