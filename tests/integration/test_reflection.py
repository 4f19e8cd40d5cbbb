"""Server reflection (v1 and v1alpha) against a real grpc.aio server, checked with real clients.

``buf curl`` (v1 first, v1alpha on request) and ``grpc_requests`` (v1alpha) must discover and call
our services through reflection alone; raw bidi streams check each request kind's exact answer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # not in stubs
from grpc_reflection.v1alpha import reflection_pb2
from grpc_requests import Client

from opea_grpc.pb.v1 import chat_pb2, chat_pb2_grpc
from opea_grpc.reflection import REFLECTION_SERVICES, enable_reflection

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
SERVICES = ("opea.v1.ChatService", "grpc.health.v1.Health")
CHAT_FILES = {"opea/v1/chat.proto", "opea/v1/common.proto", "google/protobuf/struct.proto"}
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]

# A custom option, as real protos declare them: an extension living in another file than the
# message it extends. Added to the default pool, where reflection looks first.
EXTENSION_FILE = "opea_grpc_tests/reflection_options.proto"
EXTENSION_NUMBER = 51234
_extension_proto = descriptor_pb2.FileDescriptorProto(
    name=EXTENSION_FILE,
    package="opea_grpc_tests",
    dependency=["google/protobuf/descriptor.proto"],
    extension=[
        descriptor_pb2.FieldDescriptorProto(
            name="reflection_label",
            number=EXTENSION_NUMBER,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            extendee=".google.protobuf.MessageOptions",
        )
    ],
)
descriptor_pool.Default().AddSerializedFile(_extension_proto.SerializeToString())


class EchoChat(chat_pb2_grpc.ChatServiceServicer):
    """Answers with the last message echoed back, so a response proves the request arrived."""

    async def Chat(
        self,
        request: chat_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[chat_pb2.ChatRequest, chat_pb2.ChatResponse],
    ) -> chat_pb2.ChatResponse:
        last = request.messages[-1].content if request.messages else ""
        return chat_pb2.ChatResponse(
            id="chat-1",
            model=request.model or "echo",
            message=chat_pb2.ChatMessage(role=chat_pb2.ROLE_ASSISTANT, content=f"echo: {last}"),
            finish_reason=chat_pb2.FINISH_REASON_STOP,
        )

    async def ChatStream(
        self,
        request: chat_pb2.ChatStreamRequest,
        context: grpc.aio.ServicerContext[chat_pb2.ChatStreamRequest, chat_pb2.ChatStreamResponse],
    ) -> AsyncIterator[chat_pb2.ChatStreamResponse]:
        yield chat_pb2.ChatStreamResponse(id="chat-1", content="echo")


class MethodRecorder(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in stubs only
    """Records the full method name of every call, to see which reflection version answered."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        self.methods.append(handler_call_details.method)
        return await continuation(handler_call_details)

    def used(self, service: str) -> bool:
        return f"/{service}/ServerReflectionInfo" in self.methods


@dataclass(frozen=True)
class Running:
    address: str
    recorder: MethodRecorder
    channel: grpc.aio.Channel = field(repr=False)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    recorder = MethodRecorder()
    server = grpc.aio.server(interceptors=[recorder])
    chat_pb2_grpc.add_ChatServiceServicer_to_server(EchoChat(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    enable_reflection(server, SERVICES)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=DEADLINE, wait_for_ready=True
        )
        recorder.methods.clear()
        yield Running(address, recorder, channel)
    finally:
        await channel.close(None)
        await server.stop(grace=None)


async def reflect(
    running: Running, service: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One bidi stream to ``service``, one answer per request, in order.

    The v1alpha classes serialize v1 requests too: the two versions are wire-identical.
    """
    call = running.channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter(requests), timeout=DEADLINE)
    return [response async for response in call]


def file_names(response: reflection_pb2.ServerReflectionResponse) -> list[str]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(serialized).name
        for serialized in response.file_descriptor_response.file_descriptor_proto
    ]


def pool_of(response: reflection_pb2.ServerReflectionResponse) -> descriptor_pool.DescriptorPool:
    """A fresh pool built from one response alone: it fails if a dependency is missing."""
    protos = {
        proto.name: proto
        for proto in map(
            descriptor_pb2.FileDescriptorProto.FromString,
            response.file_descriptor_response.file_descriptor_proto,
        )
    }
    pool = descriptor_pool.DescriptorPool()

    def add(name: str) -> None:
        for dependency in protos[name].dependency:
            add(dependency)
        pool.AddSerializedFile(protos[name].SerializeToString())

    for name in protos:
        add(name)
    return pool


# --- buf curl -------------------------------------------------------------------------------


def buf_binary() -> str:
    local = REPO / "node_modules" / ".bin" / "buf"
    found = str(local) if local.exists() else shutil.which("buf")
    if found is None:
        pytest.fail(f"buf not found at {local} nor on PATH: run `npm install` in {REPO}")
    return found


async def buf_curl(*arguments: str) -> str:
    """Run ``buf curl`` over gRPC without blocking the event loop the server runs in."""
    process = await asyncio.create_subprocess_exec(
        buf_binary(),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), DEADLINE)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"buf curl {' '.join(arguments)} did not finish within {DEADLINE}s")
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


@pytest.mark.parametrize(
    ("reflect_protocol", "expected", "unused"),
    [(None, V1, V1ALPHA), ("grpc-v1alpha", V1ALPHA, V1)],
)
async def test_buf_curl_lists_every_method(
    running: Running, reflect_protocol: str | None, expected: str, unused: str
) -> None:
    flags = [] if reflect_protocol is None else ["--reflect-protocol", reflect_protocol]
    listed = await buf_curl(*flags, "--list-methods", f"http://{running.address}")

    assert {
        "opea.v1.ChatService/Chat",
        "opea.v1.ChatService/ChatStream",
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
        f"{V1}/ServerReflectionInfo",
        f"{V1ALPHA}/ServerReflectionInfo",
    } <= set(listed.split())
    # By default buf tries v1 first and only falls back on UNIMPLEMENTED: v1 must have answered.
    assert running.recorder.used(expected)
    assert not running.recorder.used(unused)


async def test_buf_curl_calls_chat_with_json(running: Running) -> None:
    request = {"messages": [{"role": "ROLE_USER", "content": "hi"}]}
    url = f"http://{running.address}/opea.v1.ChatService/Chat"
    output = await buf_curl("-d", json.dumps(request), url)

    assert json.loads(output) == {
        "id": "chat-1",
        "model": "echo",
        "message": {"role": "ROLE_ASSISTANT", "content": "echo: hi"},
        "finishReason": "FINISH_REASON_STOP",
    }
    assert running.recorder.used(V1)
    assert "/opea.v1.ChatService/Chat" in running.recorder.methods


# --- grpc_requests ----------------------------------------------------------------------------


def grpc_requests_session(address: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    # A fresh pool: the default one already holds our protos, and the client would skip
    # reflection for any service it finds there.
    client = Client(address, descriptor_pool=descriptor_pool.DescriptorPool())
    try:
        services = tuple(client.service_names)
        request = {"model": "m", "messages": [{"role": "ROLE_USER", "content": "hello"}]}
        reply = client.request("opea.v1.ChatService", "Chat", request, timeout=DEADLINE)
        return services, dict(reply)
    finally:
        client.channel.close()


async def test_grpc_requests_discovers_and_calls_chat(running: Running) -> None:
    services, reply = await asyncio.wait_for(
        asyncio.to_thread(grpc_requests_session, running.address), DEADLINE
    )

    assert services == tuple(sorted({*SERVICES, *REFLECTION_SERVICES}))
    assert reply == {
        "id": "chat-1",
        "model": "m",
        "message": {"role": "ROLE_ASSISTANT", "content": "echo: hello"},
        "finish_reason": "FINISH_REASON_STOP",  # grpc_requests keeps proto field names
    }
    assert running.recorder.used(V1ALPHA)
    assert not running.recorder.used(V1)


# --- raw streams ------------------------------------------------------------------------------


@pytest.mark.parametrize("service", [V1, V1ALPHA])
async def test_list_services_is_exact(running: Running, service: str) -> None:
    (response,) = await reflect(
        running, service, reflection_pb2.ServerReflectionRequest(list_services="")
    )

    assert [s.name for s in response.list_services_response.service] == [
        "grpc.health.v1.Health",
        V1,
        V1ALPHA,
        "opea.v1.ChatService",
    ]
    assert running.recorder.used(service)


async def test_method_symbol_resolves_to_its_file_with_dependencies(running: Running) -> None:
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="opea.v1.ChatService.Chat"
    )
    (response,) = await reflect(running, V1, request)

    names = file_names(response)
    assert names[0] == "opea/v1/chat.proto"
    assert sorted(names) == sorted(CHAT_FILES)  # each file exactly once
    assert response.original_request == request
    method = pool_of(response).FindMethodByName("opea.v1.ChatService.Chat")
    assert method.input_type.full_name == "opea.v1.ChatRequest"


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("opea.v1.ChatService", "opea/v1/chat.proto"),
        ("opea.v1.ChatService.ChatStream", "opea/v1/chat.proto"),
        ("opea.v1.ChatRequest", "opea/v1/chat.proto"),
        ("opea.v1.ChatRequest.messages", "opea/v1/chat.proto"),
        ("opea.v1.Role", "opea/v1/chat.proto"),
        ("opea.v1.ROLE_USER", "opea/v1/chat.proto"),
        ("opea.v1.Document", "opea/v1/common.proto"),
        ("google.protobuf.Struct.FieldsEntry", "google/protobuf/struct.proto"),
        ("grpc.health.v1.Health.Check", "grpc_health/v1/health.proto"),
        (f"{V1}.ServerReflectionInfo", "grpc/reflection/v1/reflection.proto"),
        (f"{V1ALPHA}", "grpc_reflection/v1alpha/reflection.proto"),
    ],
)
async def test_symbols_resolve_to_their_file(running: Running, symbol: str, file: str) -> None:
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    (response,) = await reflect(running, V1, request)

    assert file_names(response)[0] == file


@pytest.mark.parametrize(
    "request_",
    [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="opea.v1.NoSuchThing"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="opea.v1.ChatService.Nope"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="opea.v1"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="opea/v1/nope.proto"),
        reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type="opea.v1.Nope"),
        reflection_pb2.ServerReflectionRequest(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="opea.v1.ChatRequest", extension_number=EXTENSION_NUMBER
            )
        ),
    ],
    ids=["symbol", "method", "package", "file", "extension-numbers", "extension"],
)
@pytest.mark.parametrize("service", [V1, V1ALPHA])
async def test_unknown_names_are_not_found(
    running: Running, service: str, request_: reflection_pb2.ServerReflectionRequest
) -> None:
    (response,) = await reflect(running, service, request_)

    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == NOT_FOUND
    assert "not found" in response.error_response.error_message
    assert response.original_request == request_


async def test_empty_request_is_invalid_argument(running: Running) -> None:
    (response,) = await reflect(running, V1, reflection_pb2.ServerReflectionRequest())

    assert response.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_file_by_filename_and_many_requests_on_one_stream(running: Running) -> None:
    responses = await reflect(
        running,
        V1,
        reflection_pb2.ServerReflectionRequest(file_by_filename="opea/v1/chat.proto"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="opea/v1/common.proto"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="nope.Nope"),
        reflection_pb2.ServerReflectionRequest(list_services=""),
    )

    assert [r.WhichOneof("message_response") for r in responses] == [
        "file_descriptor_response",
        "file_descriptor_response",
        "error_response",
        "list_services_response",
    ]
    assert sorted(file_names(responses[0])) == sorted(CHAT_FILES)
    assert file_names(responses[1]) == ["opea/v1/common.proto", "google/protobuf/struct.proto"]


async def test_extensions_are_found_by_number_and_listed(running: Running) -> None:
    by_number, numbers, none = await reflect(
        running,
        V1,
        reflection_pb2.ServerReflectionRequest(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="google.protobuf.MessageOptions",
                extension_number=EXTENSION_NUMBER,
            )
        ),
        reflection_pb2.ServerReflectionRequest(
            all_extension_numbers_of_type="google.protobuf.MessageOptions"
        ),
        reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type="opea.v1.ChatRequest"),
    )

    assert file_names(by_number) == [EXTENSION_FILE, "google/protobuf/descriptor.proto"]
    listed = numbers.all_extension_numbers_response
    assert listed.base_type_name == "google.protobuf.MessageOptions"
    assert EXTENSION_NUMBER in listed.extension_number
    assert list(listed.extension_number) == sorted(listed.extension_number)
    assert none.all_extension_numbers_response.base_type_name == "opea.v1.ChatRequest"
    assert list(none.all_extension_numbers_response.extension_number) == []


async def test_v1_schema_describes_itself(running: Running) -> None:
    """The v1 service's own schema, fetched over v1, is in the v1 package and usable as is."""
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1)
    (response,) = await reflect(running, V1, request)

    assert file_names(response) == ["grpc/reflection/v1/reflection.proto"]
    method = pool_of(response).FindMethodByName(f"{V1}.ServerReflectionInfo")
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    listing = method.output_type.fields_by_name["list_services_response"].message_type
    assert listing is not None
    assert listing.full_name == "grpc.reflection.v1.ListServiceResponse"

    # Talk v1 with classes built from that schema only.
    request_class: type[message.Message] = GetMessageClass(method.input_type)
    response_class: type[message.Message] = GetMessageClass(method.output_type)
    call = running.channel.stream_stream(
        f"/{V1}/ServerReflectionInfo",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )(iter([cast(Any, request_class)(list_services="")]), timeout=DEADLINE)
    answers: Sequence[Any] = [answer async for answer in call]
    assert [s.name for s in answers[0].list_services_response.service] == sorted(
        {*SERVICES, *REFLECTION_SERVICES}
    )
