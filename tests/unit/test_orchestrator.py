"""ServiceOrchestrator: build-time checks, scheduling, deadlines, degradation, streaming.

Node calls are plain async functions with the shape of the typed clients' methods; no gRPC here.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field

import grpc
import pytest

from opea_grpc import deadline
from opea_grpc.errors import GraphError, NodeError, ServiceError
from opea_grpc.node import REQUEST, Node, NodeStatus
from opea_grpc.orchestrator import ServiceOrchestrator
from opea_grpc.pb.v1.chat_pb2 import (
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ChatStreamResponse,
)
from opea_grpc.pb.v1.chatqna_pb2 import NodeStatus as NodeStatusProto
from opea_grpc.pb.v1.common_pb2 import Document, ScoredDocument
from opea_grpc.pb.v1.embedding_pb2 import Embedding, EmbedRequest, EmbedResponse
from opea_grpc.pb.v1.rerank_pb2 import RerankRequest, RerankResponse, RerankResult
from opea_grpc.pb.v1.retrieval_pb2 import SearchRequest, SearchResponse

GENEROUS = 5.0  # seconds: a broken scheduler fails by timeout instead of hanging the suite


@dataclass
class Ask:
    question: str = ""
    seen: list[str] = field(default_factory=list)
    answer: str = ""


Pipeline = ServiceOrchestrator[Ask]


async def embed(request: EmbedRequest, *, timeout: float) -> EmbedResponse:
    vector = [float(len(text)) for text in request.input]
    return EmbedResponse(data=[Embedding(index=0, embedding=[*vector, 0.5])], model="fake")


async def search(request: SearchRequest, *, timeout: float) -> SearchResponse:
    hits = [("d1", "alpha", 0.9), ("d2", "beta", 0.5), ("d3", "gamma", 0.1)]
    return SearchResponse(
        documents=[
            ScoredDocument(document=Document(id=id_, text=text), score=score)
            for id_, text, score in hits[: max(1, len(request.vector))]
        ]
    )


async def rerank(request: RerankRequest, *, timeout: float) -> RerankResponse:
    ordered = list(reversed(request.documents))
    return RerankResponse(
        results=[RerankResult(index=i, document=doc) for i, doc in enumerate(ordered)],
        model=f"query={request.query!r}",
    )


async def chat(request: ChatRequest, *, timeout: float) -> ChatResponse:
    cited = " ".join(doc.id for doc in request.documents)
    asked = request.messages[-1].content if request.messages else ""
    return ChatResponse(message=ChatMessage(content=f"{asked}|{cited}"))


async def chat_stream(request: ChatRequest, *, timeout: float) -> AsyncIterator[ChatStreamResponse]:
    for word in ("one", "two", "three"):
        await asyncio.sleep(0)
        yield ChatStreamResponse(content=word)


async def forever(what: str, started: asyncio.Event, cancelled: list[str]) -> None:
    """Block until cancelled, then clean up over a few loop turns (as a real call does)."""
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        for _ in range(3):  # a run that does not await its cancelled nodes returns before this
            await asyncio.sleep(0)
        cancelled.append(what)
        raise


def question_to_chat(state: Ask, inputs: Mapping[str, object]) -> ChatRequest:
    docs: list[Document] = []
    for name in sorted(inputs):
        reply = inputs[name]
        if isinstance(reply, SearchResponse):
            docs.extend(hit.document for hit in reply.documents)
    return ChatRequest(messages=[ChatMessage(content=state.question)], documents=docs)


def status_of(timings: tuple[object, ...], name: str) -> object:
    return next(t for t in timings if getattr(t, "name", None) == name)


# -- build-time errors ------------------------------------------------------------------------


def test_add_rejects_a_duplicate_name() -> None:
    pipeline = Pipeline().add(Node("embed", embed))
    with pytest.raises(GraphError, match="'embed' was already added"):
        pipeline.add(Node("embed", embed))


def test_flow_to_an_unknown_node_names_it_and_lists_the_known_ones() -> None:
    pipeline = Pipeline().add(Node("embed", embed)).add(Node("search", search))
    with pytest.raises(GraphError, match=r"unknown node 'serch'.*known nodes: embed, search"):
        pipeline.flow_to("embed", "serch")


def test_flow_to_a_node_object_that_was_not_added() -> None:
    pipeline = Pipeline().add(Node("embed", embed))
    with pytest.raises(GraphError, match="unknown node 'search'"):
        pipeline.flow_to("embed", Node("search", search))


def test_an_edge_closing_a_cycle_shows_the_cycle() -> None:
    def keep(state: Ask, inputs: Mapping[str, object]) -> EmbedRequest:
        return EmbedRequest()

    def node(name: str) -> Node[Ask, EmbedRequest, EmbedResponse]:
        return Node(name, embed, prepare=keep)

    pipeline = Pipeline().add(node("a")).add(node("b")).add(node("c"))
    pipeline.flow_to("a", "b").flow_to("b", "c")
    with pytest.raises(GraphError, match=r"cycle: c -> a -> b -> c"):
        pipeline.flow_to("c", "a")
    with pytest.raises(GraphError, match=r"cycle: b -> b"):
        pipeline.flow_to("b", "b")


def test_an_edge_without_an_adapter_is_refused() -> None:
    pipeline = Pipeline().add(Node("embed", embed)).add(Node("chat", chat))
    with pytest.raises(GraphError) as info:
        pipeline.flow_to("embed", "chat")
    message = str(info.value)
    assert "opea.v1.EmbedResponse" in message
    assert "opea.v1.ChatRequest" in message
    assert "adapter" in message


def test_an_explicit_adapter_makes_an_edge_acceptable() -> None:
    def to_chat(reply: EmbedResponse) -> ChatRequest:
        return ChatRequest(model=reply.model)

    pipeline = Pipeline().add(Node("embed", embed)).add(Node("chat", chat))
    pipeline.flow_to("embed", "chat", adapter=to_chat)
    edges = json.loads(pipeline.describe())["edges"]
    assert edges == [{"from": "embed", "to": "chat", "adapter": to_chat.__qualname__}]


def test_an_adapter_on_an_edge_into_a_prepare_hook_is_refused() -> None:
    pipeline = (
        Pipeline().add(Node("search", search)).add(Node("chat", chat, prepare=question_to_chat))
    )
    with pytest.raises(GraphError, match="prepare hook"):
        pipeline.flow_to("search", "chat", adapter=lambda reply: ChatRequest())


def test_fan_in_without_prepare_is_refused() -> None:
    pipeline = (
        Pipeline()
        .add(Node("left", search))
        .add(Node("right", search))
        .add(Node("chat", chat))
        .flow_to("left", "chat")
    )
    with pytest.raises(GraphError, match=r"fed by left, right.*prepare hook"):
        pipeline.flow_to("right", "chat")


def test_a_successor_of_an_optional_node_needs_prepare() -> None:
    pipeline = Pipeline().add(Node("search", search, optional=True)).add(Node("chat", chat))
    with pytest.raises(GraphError, match=r"follows optional node 'search'.*prepare hook"):
        pipeline.flow_to("search", "chat")


def test_stream_needs_a_sink_that_streams() -> None:
    pipeline = Pipeline().add(Node("search", search)).add(Node("chat", chat))
    pipeline.flow_to("search", "chat")
    with pytest.raises(GraphError, match="sink node 'chat' cannot stream"):
        pipeline.stream(SearchRequest(), state=Ask(), timeout=1.0)


def test_stream_needs_a_single_sink() -> None:
    pipeline = Pipeline().add(Node("a", chat, stream=chat_stream)).add(Node("b", chat))
    with pytest.raises(GraphError, match="one sink node, not a, b"):
        pipeline.stream(ChatRequest(), state=Ask(), timeout=1.0)


def test_an_empty_graph_does_not_validate() -> None:
    with pytest.raises(GraphError, match="no nodes"):
        Pipeline().validate()


def test_types_are_inferred_from_methods_callables_and_awaitable_returns() -> None:
    class Client:
        async def embed(
            self, request: EmbedRequest, *, timeout: float | None = None
        ) -> EmbedResponse:
            return EmbedResponse()

    class Callable_:
        async def __call__(self, request: SearchRequest, *, timeout: float) -> SearchResponse:
            return SearchResponse()

    def plain(request: RerankRequest, *, timeout: float) -> Awaitable[RerankResponse]:
        return rerank(request, timeout=timeout)

    method: Node[Ask, EmbedRequest, EmbedResponse] = Node("embed", Client().embed)
    assert (method.input_type, method.output_type) == (EmbedRequest, EmbedResponse)
    instance: Node[Ask, SearchRequest, SearchResponse] = Node("search", Callable_())
    assert (instance.input_type, instance.output_type) == (SearchRequest, SearchResponse)
    wrapped: Node[Ask, RerankRequest, RerankResponse] = Node("rerank", plain)
    assert (wrapped.input_type, wrapped.output_type) == (RerankRequest, RerankResponse)


def test_a_call_without_annotations_needs_explicit_types() -> None:
    async def bare(request, *, timeout):  # type: ignore[no-untyped-def]
        return request

    with pytest.raises(GraphError, match="cannot infer input_type"):
        Node("bare", bare)
    node: Node[Ask, EmbedRequest, EmbedRequest] = Node(
        "bare", bare, input_type=EmbedRequest, output_type=EmbedRequest
    )
    assert node.output_type is EmbedRequest


def test_a_node_needs_a_usable_name_and_a_positive_timeout() -> None:
    with pytest.raises(GraphError, match="cannot be named"):
        Node(REQUEST, embed)
    with pytest.raises(GraphError, match="timeout must be positive"):
        Node("embed", embed, timeout=0.0)


def test_node_status_mirrors_the_proto_enum() -> None:
    for status in NodeStatus:
        assert NodeStatusProto.Value(f"NODE_STATUS_{status.name}") == status.value


# -- running ----------------------------------------------------------------------------------


async def test_built_in_adapters_run_the_chatqna_chain() -> None:
    seen: dict[str, object] = {}

    async def recording_search(request: SearchRequest, *, timeout: float) -> SearchResponse:
        seen["search"] = SearchRequest.FromString(request.SerializeToString())
        return await search(request, timeout=timeout)

    pipeline = (
        Pipeline()
        .add(Node("embed", embed))
        .add(Node("search", recording_search))
        .add(Node("rerank", rerank))
        .add(Node("chat", chat))
        .flow_to("embed", "search")
        .flow_to("search", "rerank")
        .flow_to("rerank", "chat")
    )
    result = await pipeline.run(EmbedRequest(input=["hello", "hi"]), state=Ask(), timeout=GENEROUS)

    assert list(seen["search"].vector) == [5.0, 2.0, 0.5]  # type: ignore[attr-defined]
    assert result.outputs["rerank"].model == "query=''"  # type: ignore[attr-defined]
    assert result.outputs["chat"].message.content == "|d3 d2 d1"  # type: ignore[attr-defined]
    assert [t.name for t in result.timings] == ["embed", "search", "rerank", "chat"]
    assert not result.degraded


async def test_a_built_in_adapter_that_cannot_convert_fails_the_target_node() -> None:
    async def empty(request: EmbedRequest, *, timeout: float) -> EmbedResponse:
        return EmbedResponse()

    pipeline = Pipeline().add(Node("embed", empty)).add(Node("search", search))
    with pytest.raises(NodeError) as info:
        await pipeline.flow_to("embed", "search").run(EmbedRequest(), state=Ask(), timeout=GENEROUS)
    assert (info.value.node, info.value.code) == ("search", grpc.StatusCode.INTERNAL)
    assert "no vector" in info.value.message


async def test_search_can_feed_chat_directly() -> None:
    pipeline = Pipeline().add(Node("search", search)).add(Node("chat", chat))
    result = await pipeline.flow_to("search", "chat").run(
        SearchRequest(vector=[1.0, 2.0]), state=Ask(), timeout=GENEROUS
    )
    assert result.outputs["chat"].message.content == "|d1 d2"  # type: ignore[attr-defined]


async def test_a_source_request_of_the_wrong_type_is_refused() -> None:
    pipeline = Pipeline().add(Node("embed", embed))
    with pytest.raises(GraphError, match=r"cannot feed source node 'embed'"):
        await pipeline.run(ChatRequest(), state=Ask(), timeout=GENEROUS)


async def test_a_source_prepare_finds_the_request() -> None:
    def from_ask(state: Ask, inputs: Mapping[str, object]) -> EmbedRequest:
        request = inputs[REQUEST]
        assert isinstance(request, ChatRequest)
        return EmbedRequest(input=[request.messages[-1].content])

    pipeline = Pipeline().add(Node("embed", embed, prepare=from_ask))
    result = await pipeline.run(
        ChatRequest(messages=[ChatMessage(content="four")]), state=Ask(), timeout=GENEROUS
    )
    assert list(result.outputs["embed"].data[0].embedding) == [4.0, 0.5]  # type: ignore[attr-defined]


async def test_parallel_branches_run_concurrently() -> None:
    # Each branch waits for the other to have started: a sequential scheduler never finishes.
    left_in, right_in = asyncio.Event(), asyncio.Event()

    async def left(request: SearchRequest, *, timeout: float) -> SearchResponse:
        left_in.set()
        await right_in.wait()
        return SearchResponse(documents=[ScoredDocument(document=Document(id="L"))])

    async def right(request: SearchRequest, *, timeout: float) -> SearchResponse:
        right_in.set()
        await left_in.wait()
        return SearchResponse(documents=[ScoredDocument(document=Document(id="R"))])

    pipeline = (
        Pipeline()
        .add(Node("left", left, timeout=60.0))
        .add(Node("right", right, timeout=60.0))
        .add(Node("chat", chat, prepare=question_to_chat))
        .flow_to("left", "chat")
        .flow_to("right", "chat")
    )
    result = await asyncio.wait_for(
        pipeline.run(SearchRequest(), state=Ask(question="q"), timeout=60.0), GENEROUS
    )
    assert result.outputs["chat"].message.content == "q|L R"  # type: ignore[attr-defined]


async def test_fan_in_merges_both_outputs_absorb_fills_the_state_and_timings_are_recorded() -> None:
    merged: list[Mapping[str, object]] = []

    def merge(state: Ask, inputs: Mapping[str, object]) -> ChatRequest:
        merged.append(dict(inputs))
        return question_to_chat(state, inputs)

    def keep_answer(state: Ask, reply: ChatResponse) -> None:
        state.answer = reply.message.content

    def note(state: Ask, reply: SearchResponse) -> None:
        state.seen.extend(hit.document.id for hit in reply.documents)

    pipeline = (
        Pipeline()
        .add(Node("dense", search, absorb=note))
        .add(Node("sparse", search, absorb=note))
        .add(Node("chat", chat, prepare=merge, absorb=keep_answer))
        .flow_to("dense", "chat")
        .flow_to("sparse", "chat")
    )
    state = Ask(question="why")
    result = await pipeline.run(SearchRequest(vector=[1.0]), state=state, timeout=GENEROUS)

    assert set(merged[0]) == {"dense", "sparse"}
    assert result.state is state
    assert state.seen == ["d1", "d1"]
    assert state.answer == "why|d1 d1"
    assert sorted(t.name for t in result.timings) == ["chat", "dense", "sparse"]
    assert result.timings[-1].name == "chat"
    for timing in result.timings:
        assert timing.status is NodeStatus.OK
        assert timing.started >= 0
        assert timing.duration >= 0
        assert timing.message == ""


async def test_optional_nodes_that_fail_or_time_out_degrade_the_run() -> None:
    never = asyncio.Event()

    async def down(request: SearchRequest, *, timeout: float) -> SearchResponse:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "retrieval replica down")

    async def late(request: SearchRequest, *, timeout: float) -> SearchResponse:
        await never.wait()
        raise AssertionError("unreachable")

    pipeline = (
        Pipeline()
        .add(Node("fast", search))
        .add(Node("down", down, optional=True))
        .add(Node("late", late, optional=True, timeout=0.05))
        .add(Node("chat", chat, prepare=question_to_chat))
        .flow_to("fast", "chat")
        .flow_to("down", "chat")
        .flow_to("late", "chat")
    )
    result = await pipeline.run(SearchRequest(), state=Ask(question="q"), timeout=GENEROUS)

    assert result.degraded
    assert result.outputs["chat"].message.content == "q|d1"  # type: ignore[attr-defined]
    assert set(result.outputs) == {"fast", "chat"}
    timings = {t.name: t for t in result.timings}
    assert timings["down"].status is NodeStatus.FAILED
    assert timings["down"].message == "retrieval replica down"
    assert timings["late"].status is NodeStatus.TIMED_OUT
    assert "0.05" in timings["late"].message
    assert timings["fast"].status is timings["chat"].status is NodeStatus.OK


async def test_a_required_failure_raises_node_error_and_cancels_the_other_branch() -> None:
    slow_started = asyncio.Event()
    cancelled: list[str] = []

    async def slow(request: SearchRequest, *, timeout: float) -> SearchResponse:
        await forever("slow", slow_started, cancelled)
        raise AssertionError("unreachable")

    async def bad(request: SearchRequest, *, timeout: float) -> SearchResponse:
        await slow_started.wait()
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "no healthy replica")

    pipeline = (
        Pipeline()
        .add(Node("slow", slow, timeout=60.0))
        .add(Node("bad", bad))
        .add(Node("chat", chat, prepare=question_to_chat))
        .flow_to("slow", "chat")
        .flow_to("bad", "chat")
    )
    with pytest.raises(NodeError) as info:
        await asyncio.wait_for(pipeline.run(SearchRequest(), state=Ask(), timeout=60.0), GENEROUS)
    assert info.value.node == "bad"
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert info.value.message == "no healthy replica"
    assert cancelled == ["slow"]


async def test_a_node_gets_no_more_time_than_the_run_has_left() -> None:
    received: list[float] = []

    async def hang(request: SearchRequest, *, timeout: float) -> SearchResponse:
        received.append(timeout)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    pipeline = Pipeline().add(Node("hang", hang, timeout=10.0))
    with pytest.raises(NodeError) as info:
        await asyncio.wait_for(pipeline.run(SearchRequest(), state=Ask(), timeout=0.1), GENEROUS)
    assert info.value.node == "hang"
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(received) == 1
    assert 0 < received[0] <= 0.1


async def test_calls_a_node_makes_itself_inherit_its_deadline() -> None:
    seen: list[float | None] = []

    async def local(request: SearchRequest, *, timeout: float) -> SearchResponse:
        # What a typed client called inside this node would be bounded by.
        seen.append(deadline.remaining())
        return SearchResponse()

    pipeline = Pipeline().add(Node("local", local, timeout=0.5))
    await pipeline.run(SearchRequest(), state=Ask(), timeout=30.0)
    (left,) = seen
    assert left is not None
    assert 0 < left <= 0.5
    assert deadline.remaining() is None  # the scope ended with the node


async def test_a_node_with_no_time_left_is_not_called() -> None:
    called: list[str] = []

    async def quick(request: SearchRequest, *, timeout: float) -> SearchResponse:
        called.append("quick")
        return SearchResponse()

    pipeline = Pipeline().add(Node("quick", quick))
    with pytest.raises(NodeError) as info:
        await pipeline.run(SearchRequest(), state=Ask(), timeout=0.0)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert called == []


async def test_cancelling_the_run_cancels_every_node_and_leaves_no_task() -> None:
    before = asyncio.all_tasks()
    a_started, b_started = asyncio.Event(), asyncio.Event()
    cancelled: list[str] = []

    async def a(request: SearchRequest, *, timeout: float) -> SearchResponse:
        await forever("a", a_started, cancelled)
        raise AssertionError("unreachable")

    async def b(request: SearchRequest, *, timeout: float) -> SearchResponse:
        await forever("b", b_started, cancelled)
        raise AssertionError("unreachable")

    pipeline = Pipeline().add(Node("a", a, timeout=60.0)).add(Node("b", b, timeout=60.0))
    run = asyncio.create_task(pipeline.run(SearchRequest(), state=Ask(), timeout=60.0))
    await asyncio.wait_for(asyncio.gather(a_started.wait(), b_started.wait()), GENEROUS)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert sorted(cancelled) == ["a", "b"]
    assert asyncio.all_tasks() == before


async def test_concurrent_runs_do_not_share_state() -> None:
    def ask(state: Ask, inputs: Mapping[str, object]) -> ChatRequest:
        return ChatRequest(messages=[ChatMessage(content=state.question)])

    async def echo(request: EmbedRequest, *, timeout: float) -> EmbedResponse:
        for _ in range(3):
            await asyncio.sleep(0)
        return EmbedResponse(model=request.input[0])

    def note(state: Ask, reply: EmbedResponse) -> None:
        state.seen.append(reply.model)

    pipeline = (
        Pipeline()
        .add(Node("echo", echo, absorb=note))
        .add(Node("chat", chat, prepare=ask))
        .flow_to("echo", "chat")
    )
    questions = [f"q{i}" for i in range(20)]
    results = await asyncio.gather(
        *(
            pipeline.run(EmbedRequest(input=[q]), state=Ask(question=q), timeout=GENEROUS)
            for q in questions
        )
    )
    for question, result in zip(questions, results, strict=True):
        assert result.state.question == question
        assert result.state.seen == [question]
        assert result.outputs["echo"].model == question  # type: ignore[attr-defined]
        assert result.outputs["chat"].message.content == f"{question}|"  # type: ignore[attr-defined]


# -- streaming --------------------------------------------------------------------------------


def streaming_pipeline(
    stream: object = chat_stream, search_call: object = search
) -> ServiceOrchestrator[Ask]:
    return (
        Pipeline()
        .add(Node("search", search_call))  # type: ignore[arg-type]
        .add(Node("chat", chat, stream=stream, prepare=question_to_chat))  # type: ignore[arg-type]
        .flow_to("search", "chat")
    )


async def test_a_streamed_sink_yields_its_chunks_in_order_and_is_timed() -> None:
    async with streaming_pipeline().stream(
        SearchRequest(), state=Ask(question="q"), timeout=GENEROUS
    ) as run:
        words = [chunk.content async for chunk in run]
    assert words == ["one", "two", "three"]
    assert [t.name for t in run.timings] == ["search", "chat"]
    assert all(t.status is NodeStatus.OK for t in run.timings)
    assert set(run.outputs) == {"search"}
    assert not run.degraded
    assert run.state.question == "q"


async def test_the_sink_stream_gets_the_prepared_request_and_a_bounded_timeout() -> None:
    received: list[tuple[ChatRequest, float]] = []

    async def recording(
        request: ChatRequest, *, timeout: float
    ) -> AsyncIterator[ChatStreamResponse]:
        received.append((request, timeout))
        yield ChatStreamResponse(content="x")

    run = streaming_pipeline(recording).stream(
        SearchRequest(), state=Ask(question="q"), timeout=2.0
    )
    assert [chunk.content async for chunk in run] == ["x"]
    ((request, timeout),) = received
    assert request.messages[-1].content == "q"
    assert [doc.id for doc in request.documents] == ["d1"]
    assert 0 < timeout <= 2.0


async def test_an_upstream_failure_raises_before_any_chunk() -> None:
    opened: list[str] = []

    async def down(request: SearchRequest, *, timeout: float) -> SearchResponse:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "index offline")

    async def never_opened(
        request: ChatRequest, *, timeout: float
    ) -> AsyncIterator[ChatStreamResponse]:
        opened.append("chat")
        yield ChatStreamResponse(content="x")

    run = streaming_pipeline(never_opened, down).stream(
        SearchRequest(), state=Ask(), timeout=GENEROUS
    )
    with pytest.raises(NodeError) as info:
        await anext(run)
    assert (info.value.node, info.value.code) == ("search", grpc.StatusCode.UNAVAILABLE)
    assert opened == []
    with pytest.raises(StopAsyncIteration):
        await anext(run)


async def test_a_failure_mid_stream_raises_node_error() -> None:
    async def breaks(request: ChatRequest, *, timeout: float) -> AsyncIterator[ChatStreamResponse]:
        yield ChatStreamResponse(content="one")
        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of tokens")

    run = streaming_pipeline(breaks).stream(SearchRequest(), state=Ask(), timeout=GENEROUS)
    assert (await anext(run)).content == "one"
    with pytest.raises(NodeError) as info:
        await anext(run)
    assert (info.value.node, info.value.code) == ("chat", grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert {t.name: t.status for t in run.timings}["chat"] is NodeStatus.FAILED


async def test_closing_a_stream_early_closes_the_sink_stream() -> None:
    closed: list[str] = []

    async def endless(request: ChatRequest, *, timeout: float) -> AsyncIterator[ChatStreamResponse]:
        try:
            for i in range(1_000_000):
                yield ChatStreamResponse(content=str(i))
        finally:
            closed.append("chat")

    run = streaming_pipeline(endless).stream(SearchRequest(), state=Ask(), timeout=GENEROUS)
    assert (await anext(run)).content == "0"
    await run.aclose()
    assert closed == ["chat"]
    chat_timing = {t.name: t for t in run.timings}["chat"]
    assert chat_timing.status is NodeStatus.SKIPPED
    assert "closed" in chat_timing.message
    with pytest.raises(StopAsyncIteration):
        await anext(run)


async def test_leaving_async_with_early_closes_the_sink_stream() -> None:
    closed: list[str] = []

    async def endless(request: ChatRequest, *, timeout: float) -> AsyncIterator[ChatStreamResponse]:
        try:
            while True:
                yield ChatStreamResponse(content="tick")
        finally:
            closed.append("chat")

    async with streaming_pipeline(endless).stream(
        SearchRequest(), state=Ask(), timeout=GENEROUS
    ) as run:
        async for _ in run:
            break
    assert closed == ["chat"]


async def test_cancelling_a_stream_consumer_closes_the_sink_and_leaves_no_task() -> None:
    before = asyncio.all_tasks()
    started = asyncio.Event()
    cancelled: list[str] = []

    async def stalls(request: ChatRequest, *, timeout: float) -> AsyncIterator[ChatStreamResponse]:
        yield ChatStreamResponse(content="first")
        await forever("chat", started, cancelled)

    async def consume() -> list[str]:
        async with streaming_pipeline(stalls).stream(
            SearchRequest(), state=Ask(), timeout=60.0
        ) as run:
            return [chunk.content async for chunk in run]

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), GENEROUS)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert cancelled == ["chat"]
    assert asyncio.all_tasks() == before


async def test_cancelling_a_stream_while_upstream_runs_cancels_upstream() -> None:
    before = asyncio.all_tasks()
    started = asyncio.Event()
    cancelled: list[str] = []

    async def slow(request: SearchRequest, *, timeout: float) -> SearchResponse:
        await forever("search", started, cancelled)
        raise AssertionError("unreachable")

    run = streaming_pipeline(chat_stream, slow).stream(SearchRequest(), state=Ask(), timeout=60.0)
    consumer = asyncio.create_task(anext(run))
    await asyncio.wait_for(started.wait(), GENEROUS)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert cancelled == ["search"]
    assert asyncio.all_tasks() == before


# -- describe ---------------------------------------------------------------------------------


def chatqna() -> ServiceOrchestrator[Ask]:
    return (
        Pipeline()
        .add(Node("embed", embed, timeout=2.0))
        .add(Node("search", search))
        .add(Node("rerank", rerank, optional=True))
        .add(Node("chat", chat, stream=chat_stream, prepare=question_to_chat))
        .flow_to("embed", "search")
        .flow_to("search", "rerank")
        .flow_to("search", "chat")
        .flow_to("rerank", "chat")
    )


def test_describe_json_lists_nodes_and_edges() -> None:
    described = json.loads(chatqna().describe())
    nodes = {node["name"]: node for node in described["nodes"]}
    assert [node["name"] for node in described["nodes"]] == ["embed", "search", "rerank", "chat"]
    assert nodes["embed"] == {
        "name": "embed",
        "input": "opea.v1.EmbedRequest",
        "output": "opea.v1.EmbedResponse",
        "timeout": 2.0,
        "optional": False,
        "streams": False,
    }
    assert nodes["rerank"]["optional"] is True
    assert nodes["chat"]["streams"] is True
    edges = {(e["from"], e["to"]): e["adapter"] for e in described["edges"]}
    assert edges == {
        ("embed", "search"): "_embed_to_search",
        ("search", "rerank"): "_search_to_rerank",
        ("search", "chat"): "prepare",
        ("rerank", "chat"): "prepare",
    }


def test_describe_mermaid_draws_every_edge() -> None:
    text = chatqna().describe("mermaid")
    assert text.startswith("flowchart LR\n")
    ids = {
        label.split("<br/>")[0].split(" ")[0]: node_id
        for node_id, label in re.findall(r'^\s+(n\d+)\["([^"]*)"\]$', text, flags=re.MULTILINE)
    }
    assert set(ids) == {"embed", "search", "rerank", "chat"}
    for a, b in [("embed", "search"), ("search", "rerank"), ("search", "chat"), ("rerank", "chat")]:
        assert re.search(rf"^\s+{ids[a]} -(->|\.->)(\|[^|]*\|)? {ids[b]}$", text, re.MULTILINE), (
            a,
            b,
        )
    assert re.search(rf"{ids['rerank']} -\.->", text)  # edges leaving an optional node are dashed
    assert f"class {ids['rerank']} optional" in text
