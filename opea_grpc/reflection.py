"""gRPC server reflection, v1 and v1alpha, for ``grpc.aio`` servers.

grpcio-reflection serves only ``grpc.reflection.v1alpha`` and cannot resolve a method symbol, so
``grpcurl describe opea.v1.ChatService.Chat`` fails against it. This module serves both versions
with the same semantics. The v1 messages are wire-identical to v1alpha's, so the v1 schema is
derived at import time from the v1alpha descriptor shipped with grpcio-reflection and kept in a
private descriptor pool (a later grpcio-reflection that registers v1 in the default pool cannot
clash with it).

Every file answer carries the file and all its transitive dependencies, each once, so a client
builds the whole schema in one round trip. Lookups try the default pool, then the private one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection_pb2 as _v1alpha_pb2

__all__ = ["REFLECTION_SERVICES", "enable_reflection"]

_V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"
_V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"
_SERVICE = "ServerReflection"
_METHOD = "ServerReflectionInfo"
_K = TypeVar("_K")
_T = TypeVar("_T")

REFLECTION_SERVICES: tuple[str, ...] = (
    f"{_V1_PACKAGE}.{_SERVICE}",
    f"{_V1ALPHA_PACKAGE}.{_SERVICE}",
)
"""The services :func:`enable_reflection` adds, newest first."""


def _v1_file_proto() -> descriptor_pb2.FileDescriptorProto:
    """The v1alpha reflection file, renamed into the v1 package (the official v1 file's options)."""
    source: descriptor.FileDescriptor = _v1alpha_pb2.DESCRIPTOR
    proto = descriptor_pb2.FileDescriptorProto()
    source.CopyToProto(proto)
    proto.name = _V1_FILE_NAME
    proto.package = _V1_PACKAGE
    old_prefix, new_prefix = f".{_V1ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."

    def rename(holder: message.Message, attribute: str) -> None:
        type_name: str = getattr(holder, attribute)
        if type_name.startswith(old_prefix):
            setattr(holder, attribute, new_prefix + type_name.removeprefix(old_prefix))

    def messages(
        types: Iterable[descriptor_pb2.DescriptorProto],
    ) -> Iterator[descriptor_pb2.DescriptorProto]:
        for message_type in types:
            yield message_type
            yield from messages(message_type.nested_type)

    for message_type in messages(proto.message_type):
        for field in (*message_type.field, *message_type.extension):
            rename(field, "type_name")
            rename(field, "extendee")
    for service in proto.service:
        for method in service.method:
            rename(method, "input_type")
            rename(method, "output_type")
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    return proto


_PRIVATE_POOL = descriptor_pool.DescriptorPool()
_V1_FILE = _PRIVATE_POOL.AddSerializedFile(_v1_file_proto().SerializeToString())


def _messages(
    file: descriptor.FileDescriptor,
) -> tuple[type[message.Message], type[message.Message]]:
    """The (request, response) message classes of a reflection file."""
    return (
        GetMessageClass(file.message_types_by_name["ServerReflectionRequest"]),
        GetMessageClass(file.message_types_by_name["ServerReflectionResponse"]),
    )


class _NotFound(LookupError):
    """A lookup that found nothing; its message goes to the client as the error message."""


def _dependency_closure(file: descriptor.FileDescriptor) -> list[descriptor.FileDescriptor]:
    """``file`` first, then each of its transitive dependencies once."""
    closure = {file.name: file}
    pending = [file]
    while pending:
        for dependency in pending.pop().dependencies:
            if dependency.name not in closure:
                closure[dependency.name] = dependency
                pending.append(dependency)
    return list(closure.values())


class _Reflector:
    """Answers reflection requests from the default pool, then the private one."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self._services = sorted({*service_names, *REFLECTION_SERVICES})
        self._pools = (descriptor_pool.Default(), _PRIVATE_POOL)

    def answer(
        self, request: message.Message, response_type: type[message.Message]
    ) -> message.Message:
        kind = request.WhichOneof("message_request")
        value: Any = getattr(request, kind) if kind else None
        try:
            match kind:
                case "file_by_filename":
                    body = self._files(self._first(f"file {value!r}", _file_by_name, value))
                case "file_containing_symbol":
                    body = self._files(self._first(f"symbol {value!r}", _file_of_symbol, value))
                case "file_containing_extension":
                    what = f"extension {value.extension_number} of {value.containing_type!r}"
                    key = (value.containing_type, value.extension_number)
                    body = self._files(self._first(what, _file_of_extension, key))
                case "all_extension_numbers_of_type":
                    numbers = self._first(f"message type {value!r}", _extension_numbers, value)
                    body = {
                        "all_extension_numbers_response": {
                            "base_type_name": value,
                            "extension_number": numbers,
                        }
                    }
                case "list_services":
                    services = [{"name": name} for name in self._services]
                    body = {"list_services_response": {"service": services}}
                case _:
                    detail = "empty request: set one of the message_request fields"
                    body = _error(grpc.StatusCode.INVALID_ARGUMENT, detail)
        except _NotFound as error:
            body = _error(grpc.StatusCode.NOT_FOUND, str(error))
        # The message's fields as keywords (nested dicts build nested messages).
        build: Any = response_type
        answer: message.Message = build(original_request=request, **body)
        return answer

    def _first(
        self, what: str, find: Callable[[descriptor_pool.DescriptorPool, _K], _T], key: _K
    ) -> _T:
        """The first pool's answer to ``find(pool, key)``; a KeyError in every pool is NOT_FOUND."""
        for pool in self._pools:
            try:
                return find(pool, key)
            except KeyError:
                continue
        raise _NotFound(f"{what} not found on this server")

    @staticmethod
    def _files(file: descriptor.FileDescriptor) -> dict[str, Any]:
        serialized = []
        for each in _dependency_closure(file):
            proto = descriptor_pb2.FileDescriptorProto()
            each.CopyToProto(proto)
            serialized.append(proto.SerializeToString())
        return {"file_descriptor_response": {"file_descriptor_proto": serialized}}


def _error(code: grpc.StatusCode, detail: str) -> dict[str, Any]:
    number: int = code.value[0]
    return {"error_response": {"error_code": number, "error_message": detail}}


def _file_by_name(pool: descriptor_pool.DescriptorPool, name: str) -> descriptor.FileDescriptor:
    return pool.FindFileByName(name)


def _file_of_symbol(pool: descriptor_pool.DescriptorPool, symbol: str) -> descriptor.FileDescriptor:
    # upb finds messages, enums, enum values, fields, oneofs, services and extensions; not methods.
    try:
        return pool.FindFileContainingSymbol(symbol)
    except KeyError:
        return pool.FindMethodByName(symbol).containing_service.file


def _file_of_extension(
    pool: descriptor_pool.DescriptorPool, key: tuple[str, int]
) -> descriptor.FileDescriptor:
    containing_type, number = key
    extension = pool.FindExtensionByNumber(pool.FindMessageTypeByName(containing_type), number)
    return pool.FindFileContainingSymbol(extension.full_name)


def _extension_numbers(pool: descriptor_pool.DescriptorPool, type_name: str) -> list[int]:
    extensions = pool.FindAllExtensions(pool.FindMessageTypeByName(type_name))
    return sorted(extension.number for extension in extensions)


def _handlers(
    reflector: _Reflector, file: descriptor.FileDescriptor
) -> dict[str, grpc.RpcMethodHandler[message.Message, message.Message]]:
    request_type, response_type = _messages(file)

    async def server_reflection_info(
        requests: AsyncIterator[message.Message],
        context: grpc.aio.ServicerContext[message.Message, message.Message],
    ) -> AsyncIterator[message.Message]:
        async for request in requests:
            yield reflector.answer(request, response_type)

    handler = grpc.stream_stream_rpc_method_handler(
        server_reflection_info,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )
    return {_METHOD: handler}


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve v1 and v1alpha reflection for service_names (plus the reflection services
    themselves) on server.

    Call it before ``server.start()``. ``list_services`` answers the given names and
    :data:`REFLECTION_SERVICES`, sorted and without duplicates; the schemas come from the
    default descriptor pool, so import the generated ``_pb2`` modules of those services.

    >>> server = grpc.aio.server()
    >>> chat_pb2_grpc.add_ChatServiceServicer_to_server(MyChat(), server)
    >>> enable_reflection(server, ["opea.v1.ChatService", "grpc.health.v1.Health"])
    """
    reflector = _Reflector(service_names)
    v1alpha_file: descriptor.FileDescriptor = _v1alpha_pb2.DESCRIPTOR
    for service_name, file in zip(REFLECTION_SERVICES, (_V1_FILE, v1alpha_file), strict=True):
        handlers = _handlers(reflector, file)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, handlers),)
        )
        # grpcio >= 1.62 routes registered methods past the generic lookup, as generated code does.
        register = getattr(server, "add_registered_method_handlers", None)
        if register is not None:
            register(service_name, handlers)
