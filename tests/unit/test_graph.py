"""The pure graph functions, on plain names and edges."""

from __future__ import annotations

import re

import pytest

from opea_grpc import graph
from opea_grpc.errors import GraphError

CHAIN = [("embed", "search"), ("search", "rerank"), ("rerank", "chat")]
DIAMOND = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]


def test_predecessors_and_successors_list_every_node() -> None:
    nodes = ["a", "b", "c", "d", "lonely"]
    assert graph.predecessors(nodes, DIAMOND) == {
        "a": (),
        "b": ("a",),
        "c": ("a",),
        "d": ("b", "c"),
        "lonely": (),
    }
    assert graph.successors(nodes, DIAMOND) == {
        "a": ("b", "c"),
        "b": ("d",),
        "c": ("d",),
        "d": (),
        "lonely": (),
    }


def test_sources_and_sinks_keep_node_order() -> None:
    nodes = ["lonely", "a", "b", "c", "d"]
    assert graph.sources(nodes, DIAMOND) == ("lonely", "a")
    assert graph.sinks(nodes, DIAMOND) == ("lonely", "d")


def test_find_path_follows_edges_forward_only() -> None:
    assert graph.find_path(CHAIN, "embed", "chat") == ("embed", "search", "rerank", "chat")
    assert graph.find_path(CHAIN, "chat", "embed") is None
    assert graph.find_path(CHAIN, "search", "search") == ("search",)


def test_cycle_if_added_shows_the_whole_cycle() -> None:
    assert graph.cycle_if_added(CHAIN, ("chat", "search")) == ("chat", "search", "rerank", "chat")
    assert graph.cycle_if_added(CHAIN, ("embed", "embed")) == ("embed", "embed")
    assert graph.cycle_if_added(CHAIN, ("embed", "chat")) is None


def test_find_cycle() -> None:
    assert graph.find_cycle(["a", "b", "c", "d"], DIAMOND) is None
    cycle = graph.find_cycle(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "b")])
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"b", "c"}


def test_topological_order_puts_every_edge_forward_and_keeps_ties_in_node_order() -> None:
    order = graph.topological_order(["d", "c", "b", "a"], DIAMOND)
    assert order == ("a", "c", "b", "d")
    position = {name: index for index, name in enumerate(order)}
    assert all(position[x] < position[y] for x, y in DIAMOND)


def test_topological_order_of_a_cycle_names_it() -> None:
    with pytest.raises(GraphError, match=r"cycle: (x -> y -> x|y -> x -> y)"):
        graph.topological_order(["x", "y"], [("x", "y"), ("y", "x")])


def test_format_path() -> None:
    assert graph.format_path(("a", "b", "c", "a")) == "a -> b -> c -> a"


def test_render_mermaid_draws_every_node_and_edge() -> None:
    text = graph.render_mermaid(
        ["embed", "search", "rerank", "chat"],
        CHAIN,
        labels={"chat": 'chat "llm" <x>'},
        dashed={"rerank"},
        edge_labels={("embed", "search"): "embed_to_search"},
    )
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    ids = dict(re.findall(r'^\s+(n\d+)\["([^"]*)"\]$', text, flags=re.MULTILINE))
    by_label = {label: node_id for node_id, label in ids.items()}
    assert set(by_label) == {"embed", "search", "rerank", "chat #quot;llm#quot; #lt;x#gt;"}
    embed, search, rerank = by_label["embed"], by_label["search"], by_label["rerank"]
    chat = by_label["chat #quot;llm#quot; #lt;x#gt;"]
    assert f'    {embed} -->|"embed_to_search"| {search}' in lines
    assert f"    {search} --> {rerank}" in lines
    assert f"    {rerank} -.-> {chat}" in lines
    assert f"    class {rerank} optional" in lines


def test_render_mermaid_without_dashed_nodes_has_no_class_lines() -> None:
    text = graph.render_mermaid(["a", "b"], [("a", "b")])
    assert "classDef" not in text
    assert "n0 --> n1" in text
