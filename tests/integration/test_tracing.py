"""Tracing across processes: one request to the gateway is one trace in an OTLP receiver.

The four services and the gateway run as separate ``opea-grpc serve`` processes configured only
by the standard ``OTEL_*`` variables; the receiver is an OTLP/gRPC ``TraceService`` built here from
the published OTLP protobuf definitions (``opentelemetry-proto``) on loopback.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from opea_grpc.client import ChatQnAClient
from opea_grpc.pb.v1 import chat_pb2, chatqna_pb2
from tests.processes import served

pytestmark = pytest.mark.slow

SERVICES = ("embedding", "retrieval", "rerank", "chat")
NODES = {"node embed", "node retrieve", "node rerank", "node chat"}
#: Seconds the spans of one request may take to reach the receiver (exporters batch them).
ARRIVAL = 60


@dataclass
class Received:
    """A span as the receiver got it, with the service that sent it."""

    service: str
    span: trace_pb2.Span


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span, by trace id."""

    traces: dict[bytes, list[Received]] = field(default_factory=lambda: defaultdict(list))
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            name = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.traces[span.trace_id].append(Received(name, span))
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def trace_of(self, root_name: str, *expected: tuple[str, str]) -> list[Received]:
        """The trace whose one root span is ``root_name``, once it holds a span of each
        ``(service, span name)`` in ``expected`` (spans arrive in batches, process by process)."""
        return await asyncio.wait_for(self._complete(root_name, set(expected)), ARRIVAL)

    async def _complete(self, root_name: str, expected: set[tuple[str, str]]) -> list[Received]:
        while True:
            for spans in self.traces.values():
                roots = [r.span.name for r in spans if not r.span.parent_span_id]
                names = {(r.service, r.span.name) for r in spans}
                if roots == [root_name] and expected <= names:
                    return spans
            self.arrived.clear()
            await self.arrived.wait()


def attributes(span: trace_pb2.Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        values[a.key] = getattr(a.value, kind) if kind else None
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Mesh:
    receiver: Receiver
    rest: str
    grpc_target: str
    gateway_log: Path


@pytest.fixture
async def mesh(tmp_path: Path, subprocess_env: dict[str, str]) -> AsyncIterator[Mesh]:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    env = {
        **subprocess_env,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OPEA_HOST": "127.0.0.1",
        "OPEA_EMBEDDING_BACKEND": "hashing",
        "OPEA_RETRIEVAL_DATA_DIR": str(tmp_path / "retrieval"),
        "OPEA_LOG_FORMAT": "json",
        "OPEA_GATEWAY_ACCESS_LOG": "true",
    }
    rest, face = free_port(), free_port()
    async with AsyncExitStack() as stack:
        targets = {}
        for name in SERVICES:
            child = await stack.enter_async_context(
                served(env, "-m", "opea_grpc", "serve", name, "--port", "0")
            )
            targets[f"OPEA_GATEWAY_{name.upper()}"] = child.target
        await stack.enter_async_context(
            served(
                {**env, **targets, "OPEA_GATEWAY_REST_PORT": str(rest)},
                "-m",
                "opea_grpc",
                "serve",
                "gateway",
                "--port",
                str(face),
                stderr=tmp_path / "gateway.log",
            )
        )
        base = f"http://127.0.0.1:{rest}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            for _ in range(300):  # the gateway is ready once it sees every service SERVING
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            ingested = await http.post(
                "/v1/ingest",
                json={"documents": [{"id": "ports", "text": "The gateway listens on port 8888."}]},
            )
            assert ingested.status_code == 200, ingested.text
        yield Mesh(receiver, base, f"127.0.0.1:{face}", tmp_path / "gateway.log")
        await stack.aclose()
    await server.stop(None)


def check_one_trace(spans: list[Received]) -> dict[str, Received]:
    """Every span of a trace hangs off the one root; returns the spans by name (first of each)."""
    ids = {r.span.span_id for r in spans}
    roots = [r for r in spans if not r.span.parent_span_id]
    assert len(roots) == 1, [r.span.name for r in roots]
    orphans = [
        (r.service, r.span.name)
        for r in spans
        if r.span.parent_span_id and r.span.parent_span_id not in ids
    ]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    by_name: dict[str, Received] = {}
    for r in spans:
        by_name.setdefault(r.span.name, r)
    return by_name


async def test_a_rest_chat_request_is_one_trace_across_every_process(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.rest, timeout=30) as http:
        answer = await http.post(
            "/v1/chat/completions",
            headers={"x-request-id": "trace-test-1"},
            json={
                "model": "extractive-answerer",
                "messages": [{"role": "user", "content": "Which port does the gateway use?"}],
                "opea": {"cache": False},
            },
        )
    assert answer.status_code == 200, answer.text
    hops = [
        ("opea.v1.EmbeddingService/Embed", "opea-embedding"),
        ("opea.v1.RetrievalService/Search", "opea-retrieval"),
        ("opea.v1.RerankService/Rerank", "opea-rerank"),
        ("opea.v1.ChatService/Chat", "opea-chat"),
    ]
    spans = await mesh.receiver.trace_of(
        "POST /v1/chat/completions",
        *((service, method) for method, service in hops),
        *(("opea-gateway", node) for node in NODES),
    )
    by_name = check_one_trace(spans)
    root = by_name["POST /v1/chat/completions"]
    assert root.service == "opea-gateway"
    assert attributes(root.span)["opea.request_id"] == "trace-test-1"
    assert attributes(root.span)["http.response.status_code"] == 200
    assert set(by_name) >= NODES, sorted(by_name)
    spans_by_id = {r.span.span_id: r for r in spans}
    for method, service in hops:
        calls = [r for r in spans if r.span.name == method]
        client = [r for r in calls if r.span.kind == trace_pb2.Span.SPAN_KIND_CLIENT]
        server = [r for r in calls if r.span.kind == trace_pb2.Span.SPAN_KIND_SERVER]
        assert len(client) == 1, [(r.service, r.span.kind) for r in calls]
        assert len(server) == 1, [(r.service, r.span.kind) for r in calls]
        assert client[0].service == "opea-gateway"
        assert server[0].service == service
        # server span <- client span <- the node's span <- the request's span
        assert server[0].span.parent_span_id == client[0].span.span_id
        node = spans_by_id[client[0].span.parent_span_id]
        assert node.span.name.startswith("node "), node.span.name
        assert node.span.parent_span_id == root.span.span_id
    chat = next(r for r in spans if r.service == "opea-chat" and r.span.name.endswith("/Chat"))
    assert attributes(chat.span)["gen_ai.usage.output_tokens"] > 0
    # The gateway's access line (JSON) carries the same request id and trace id.
    lines = [json.loads(line) for line in mesh.gateway_log.read_text().splitlines()]
    access = [e for e in lines if e["logger"] == "gateway.access"]
    mine = [e for e in access if e.get("request_id") == "trace-test-1"]
    assert len(mine) == 1, access
    assert mine[0]["trace_id"] == root.span.trace_id.hex()
    assert "POST /v1/chat/completions 200" in mine[0]["message"]


async def test_a_streamed_answer_records_time_to_first_chunk(mesh: Mesh) -> None:
    async with (
        httpx.AsyncClient(base_url=mesh.rest, timeout=30) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "extractive-answerer",
                "stream": True,
                "messages": [{"role": "user", "content": "Which port does the gateway listen on?"}],
            },
        ) as response,
    ):
        assert response.status_code == 200
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    spans = await mesh.receiver.trace_of(
        "POST /v1/chat/completions",
        ("opea-gateway", "node chat"),
        ("opea-chat", "opea.v1.ChatService/ChatStream"),
    )
    by_name = check_one_trace(spans)
    chat = attributes(by_name["node chat"].span)
    # every event but [DONE] came from a chunk (the usage chunk is relayed only when asked for)
    assert chat["opea.stream.chunks"] >= len(events) - 1
    assert chat["opea.stream.time_to_first_chunk_ms"] >= 0
    stream = [r for r in spans if r.span.name.endswith("/ChatStream")]
    assert {r.service for r in stream} == {"opea-gateway", "opea-chat"}


async def test_a_grpc_request_to_the_gateway_is_one_trace(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        question = chat_pb2.ChatMessage(
            role=chat_pb2.ROLE_USER, content="Where does the gateway listen?"
        )
        reply = await ChatQnAClient(channel).ask(
            chatqna_pb2.AskRequest(chat=chat_pb2.ChatRequest(messages=[question])), timeout=30
        )
    assert reply.chat.message.content
    spans = await mesh.receiver.trace_of(
        "opea.v1.ChatQnAService/Ask",
        ("opea-gateway", "node chat"),
        ("opea-chat", "opea.v1.ChatService/Chat"),
        ("opea-retrieval", "opea.v1.RetrievalService/Search"),
    )
    by_name = check_one_trace(spans)
    assert {"node chat", "node retrieve"} <= set(by_name)


async def test_a_request_its_caller_did_not_sample_records_nothing(mesh: Mesh) -> None:
    unsampled = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with httpx.AsyncClient(base_url=mesh.rest, timeout=30) as http:
        for traceparent in (f"00-{unsampled}-00f067aa0ba902b7-00", None):
            answer = await http.post(
                "/v1/chat/completions",
                headers={"traceparent": traceparent} if traceparent else {},
                json={
                    "model": "extractive-answerer",
                    "messages": [{"role": "user", "content": "Which port does it use?"}],
                    "opea": {"cache": False},
                },
            )
            assert answer.status_code == 200, answer.text
    # Every process exports in order: once the later (sampled) request's spans are all here,
    # the earlier one's would be too, had any been recorded.
    await mesh.receiver.trace_of(
        "POST /v1/chat/completions",
        *(
            (f"opea-{s}", m)
            for s, m in [
                ("embedding", "opea.v1.EmbeddingService/Embed"),
                ("retrieval", "opea.v1.RetrievalService/Search"),
                ("rerank", "opea.v1.RerankService/Rerank"),
                ("chat", "opea.v1.ChatService/Chat"),
            ]
        ),
    )
    assert bytes.fromhex(unsampled) not in mesh.receiver.traces


async def test_an_unsampled_grpc_request_starts_no_trace_downstream(mesh: Mesh) -> None:
    """The gateway's gRPC face, asked without sampling, passes that on: no span anywhere, and
    no downstream call starts a trace of its own."""
    unsampled = "5bf92f3577b34da6a3ce929d0e0e4737"
    question = chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="Where does it listen?")
    ask = chatqna_pb2.AskRequest(chat=chat_pb2.ChatRequest(messages=[question]))
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        client = ChatQnAClient(channel)
        await client.ask(
            ask, timeout=30, metadata=(("traceparent", f"00-{unsampled}-00f067aa0ba902b7-00"),)
        )
        await client.ask(ask, timeout=30)
    spans = await mesh.receiver.trace_of(
        "opea.v1.ChatQnAService/Ask",
        ("opea-gateway", "node chat"),
        ("opea-chat", "opea.v1.ChatService/Chat"),
    )
    assert bytes.fromhex(unsampled) not in mesh.receiver.traces
    roots = [
        r.span.name
        for trace in mesh.receiver.traces.values()
        for r in trace
        if not r.span.parent_span_id and trace is not spans
    ]
    pipeline = ("/Embed", "/Search", "/Rerank", "/Chat", "/ChatStream")
    assert not [name for name in roots if name.endswith(pipeline)], roots
