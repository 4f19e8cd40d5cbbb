"""Bad input on every gRPC method of every service: hypothesis-made messages (any field set to
anything its type allows), raw garbage bytes, and messages past the size limit.

Each service runs as its own process (a native crash would show as a dead process, not a failed
test), with the gateway in front. No call may end INTERNAL or UNKNOWN (a bug the server did not
expect), nor UNAVAILABLE or DEADLINE_EXCEEDED (a process gone or stuck); afterwards every process
is alive and SERVING, logged no traceback, and the documents ingested before the fuzz are all
found. The REST facade is fuzzed by ``tests/gateway/test_schemathesis.py``.
"""

from __future__ import annotations

import asyncio
import collections
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opea_grpc.pb.v1 import (
    chat_pb2,
    chatqna_pb2,
    common_pb2,
    embedding_pb2,
    rerank_pb2,
    retrieval_pb2,
)
from tests.faults.messages import message_of, mutant
from tests.faults.processes import free_port, serve_argv
from tests.processes import Served, served

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

#: Examples per method, of messages and of garbage.
EXAMPLES = 100
#: Statuses that mean something went wrong on the server's side.
BAD = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
TIMEOUT = 20.0
#: The services' default OPEA_MAX_MESSAGE_BYTES (16 MiB), and a little more.
TOO_LARGE = 16 * 1024 * 1024 + 1024

SERVICES = {
    "embedding": [embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]],
    "retrieval": [retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"]],
    "rerank": [rerank_pb2.DESCRIPTOR.services_by_name["RerankService"]],
    "chat": [chat_pb2.DESCRIPTOR.services_by_name["ChatService"]],
    "gateway": [chatqna_pb2.DESCRIPTOR.services_by_name["ChatQnAService"]],
}
MODELS = common_pb2.DESCRIPTOR.services_by_name["ModelService"]
METHODS: list[tuple[str, MethodDescriptor]] = [
    (process, method)
    for process, services in SERVICES.items()
    for service in [*services, MODELS]
    for method in service.methods
]
IDS = [f"{p}:{m.containing_service.name}/{m.name}" for p, m in METHODS]

#: How the calls ended, by method: printed at the end, to show the fuzz got past validation.
SEEN: collections.Counter[tuple[str, str]] = collections.Counter()

KEEP = f"keep-{secrets.token_hex(6)}"
#: What the valid requests the fuzz changes name (KEEP it never names but by a 1 in 2**48
#: chance); not one of the words ``messages`` draws strings from, so nothing drops it early.
FUZZ_COLLECTION = "fuzzed"
QUESTION = chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="What about the deadlines?")
PASSAGE = common_pb2.Document(id="p", text="Deadlines travel downstream with every call.")
CHAT = chat_pb2.ChatRequest(messages=[QUESTION], documents=[PASSAGE])
ASK = chatqna_pb2.AskRequest(
    chat=chat_pb2.ChatRequest(messages=[QUESTION]),
    rag=chatqna_pb2.RagOptions(collection=FUZZ_COLLECTION, top_k=5, top_n=2),
)
#: A valid request of each method, for :func:`mutant` to change a field or two of.
VALID: dict[str, object] = {
    "Embed": embedding_pb2.EmbedRequest(input=["a passage to embed"]),
    "Search": retrieval_pb2.SearchRequest(collection=FUZZ_COLLECTION, query="gateway", top_k=3),
    "SearchBatch": retrieval_pb2.SearchBatchRequest(
        requests=[
            retrieval_pb2.SearchRequest(collection=FUZZ_COLLECTION, query="gateway", top_k=3),
            retrieval_pb2.SearchRequest(collection=FUZZ_COLLECTION, query="health"),
        ]
    ),
    "Upsert": retrieval_pb2.UpsertRequest(
        collection=FUZZ_COLLECTION,
        documents=[common_pb2.Document(id="u", text="upserted", embedding=[0.05] * 384)],
    ),
    "Delete": retrieval_pb2.DeleteRequest(collection=FUZZ_COLLECTION, ids=["u"]),
    "ListCollections": retrieval_pb2.ListCollectionsRequest(),
    "DeleteCollection": retrieval_pb2.DeleteCollectionRequest(name="fuzz-gone"),
    "Rerank": rerank_pb2.RerankRequest(query="deadlines", documents=[PASSAGE, PASSAGE]),
    "RerankBatch": rerank_pb2.RerankBatchRequest(
        requests=[
            rerank_pb2.RerankRequest(query="deadlines", documents=[PASSAGE, PASSAGE]),
            rerank_pb2.RerankRequest(query="ports", documents=[PASSAGE], top_n=1),
        ]
    ),
    "Chat": CHAT,
    "ChatStream": chat_pb2.ChatStreamRequest(request=CHAT),
    "Ask": ASK,
    "AskStream": chatqna_pb2.AskStreamRequest(request=ASK),
    "ListModels": common_pb2.ListModelsRequest(),
}
DOCUMENTS = [
    {"id": f"doc-{i}", "text": f"Passage number {i} is about the {word} of the gateway."}
    for i, word in enumerate(["ports", "health", "deadlines", "replicas", "caches", "keys"])
]


@dataclass
class Fuzzed:
    processes: dict[str, Served]
    channels: dict[str, grpc.aio.Channel]
    rest: str
    logs: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzzed(
    subprocess_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fuzzed]:
    logs = tmp_path_factory.mktemp("fuzz")
    env = {
        **subprocess_env,
        "OPEA_EMBEDDING_BACKEND": "hashing",
        "OPEA_RETRIEVAL_DATA_DIR": str(logs / "retrieval"),
    }
    async with AsyncExitStack() as stack:
        processes: dict[str, Served] = {}
        for name in ("embedding", "retrieval", "rerank", "chat"):
            processes[name] = await stack.enter_async_context(
                served(env, *serve_argv(name), stderr=logs / f"{name}.log")
            )
        rest = free_port()
        gateway_env = {
            **env,
            **{f"OPEA_GATEWAY_{n.upper()}": p.target for n, p in processes.items()},
            "OPEA_GATEWAY_REST_PORT": str(rest),
        }
        processes["gateway"] = await stack.enter_async_context(
            served(
                gateway_env,
                *serve_argv("gateway"),
                ready=re.compile(r"^gateway listening on (\S+:\d+)"),
                stderr=logs / "gateway.log",
            )
        )
        channels = {}
        for name, proc in processes.items():
            channels[name] = grpc.aio.insecure_channel(
                proc.target, options=[("grpc.max_send_message_length", 2 * TOO_LARGE)]
            )
            stack.push_async_callback(channels[name].close, None)
        base = f"http://127.0.0.1:{rest}"
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            await ready(http)
            for collection in (KEEP, FUZZ_COLLECTION):
                reply = await http.post(
                    "/v1/ingest", json={"documents": DOCUMENTS, "collection": collection}
                )
                assert reply.status_code == 200, reply.text
        yield Fuzzed(processes, channels, base, logs)


async def ready(http: httpx.AsyncClient) -> None:
    for _ in range(600):
        if (await http.get("/readyz")).status_code == 200:
            return
        await _pause()
    raise AssertionError("the gateway never saw every service SERVING")


async def _pause() -> None:
    await asyncio.sleep(0.05)


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def call(channel: grpc.aio.Channel, method: MethodDescriptor, data: bytes) -> grpc.StatusCode:
    """Send ``data`` as the request of ``method``; the status it ends with (never a BAD one)."""
    code, details = grpc.StatusCode.OK, ""
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path(method), None, None)
            async for _ in stream(data, timeout=TIMEOUT):
                pass
        else:
            await channel.unary_unary(path(method), None, None)(data, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    SEEN[path(method), code.name] += 1
    assert code not in BAD, f"{path(method)} answered {code.name}: {details}"
    return code


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize(("process", "method"), METHODS, ids=IDS)
@FUZZ
@given(data=st.data())
async def test_generated_messages(
    fuzzed: Fuzzed, process: str, method: MethodDescriptor, data: st.DataObject
) -> None:
    request = data.draw(message_of(method.input_type), label="request")
    await call(fuzzed.channels[process], method, request.SerializeToString())


@pytest.mark.parametrize(("process", "method"), METHODS, ids=IDS)
@FUZZ
@given(data=st.data())
async def test_valid_requests_with_a_field_or_two_changed(
    fuzzed: Fuzzed, process: str, method: MethodDescriptor, data: st.DataObject
) -> None:
    valid = VALID[method.name]
    assert isinstance(valid, Message)
    request = data.draw(mutant(valid), label="request")
    await call(fuzzed.channels[process], method, request.SerializeToString())


@pytest.mark.parametrize(("process", "method"), METHODS, ids=IDS)
@FUZZ
@given(garbage=st.binary(max_size=300))
async def test_garbage_bytes(
    fuzzed: Fuzzed, process: str, method: MethodDescriptor, garbage: bytes
) -> None:
    await call(fuzzed.channels[process], method, garbage)


@pytest.mark.parametrize(("process", "method"), METHODS, ids=IDS)
async def test_bytes_that_are_no_message_are_invalid_argument(
    fuzzed: Fuzzed, process: str, method: MethodDescriptor
) -> None:
    # A varint that never ends: no message of any type parses from it (grpcio alone would
    # answer UNKNOWN, quoting the parser's exception).
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fuzzed.channels[process].unary_unary(path(method), None, None)(
            b"\xff" * 11, timeout=TIMEOUT
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"the request to {path(method)} is not a valid message" in (
        refused.value.details() or ""
    )


@pytest.mark.parametrize("process", list(SERVICES))
async def test_a_message_past_the_size_limit_is_refused(fuzzed: Fuzzed, process: str) -> None:
    method = SERVICES[process][0].methods[0]
    code = await call(fuzzed.channels[process], method, b"\x0a" + b"\xff" * TOO_LARGE)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_every_process_still_serves_and_the_data_is_intact(fuzzed: Fuzzed) -> None:
    by_method: dict[str, dict[str, int]] = {}
    for (method, code), count in sorted(SEEN.items()):
        by_method.setdefault(method, {})[code] = count
    print(f"fuzz: {sum(SEEN.values())} calls")
    for method, codes in by_method.items():
        print(f"  {method}: {codes}")
    for name, proc in fuzzed.processes.items():
        assert proc.proc.returncode is None, f"{name} exited with {proc.proc.returncode}"
        health = health_pb2_grpc.HealthStub(fuzzed.channels[name])
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    async with httpx.AsyncClient(base_url=fuzzed.rest, timeout=60) as http:
        listed = (await http.get("/v1/collections")).json()["data"]
        assert {"name": KEEP, "dimensions": 384, "document_count": len(DOCUMENTS)} in listed
        for doc in DOCUMENTS:
            reply = await http.post(
                "/v1/search", json={"query": doc["text"], "collection": KEEP, "top_k": 1}
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["data"][0]["id"] == f"{doc['id']}#0"
        answer = await http.post(
            "/v1/chat/completions",
            json={
                "model": "extractive-answerer",
                "messages": [{"role": "user", "content": "What about the deadlines?"}],
                "opea": {"collection": KEEP},
            },
        )
        assert answer.status_code == 200, answer.text
    for log in sorted(fuzzed.logs.glob("*.log")):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
