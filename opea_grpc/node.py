"""One step of a pipeline: a typed call, what it takes and returns, and how it ended.

A :class:`Node` wraps one call of a typed client (``call(request, *, timeout)``); its input and
output types default to the annotations of that call. :data:`BUILTIN_ADAPTERS` turns one reply of
the ChatQnA chain into the next request. The graph of nodes and its runs live in
:mod:`opea_grpc.orchestrator` and :mod:`opea_grpc.run`.
"""

from __future__ import annotations

import enum
import inspect
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from opea_grpc.cache import Cache
from opea_grpc.errors import GraphError, ServiceError
from opea_grpc.pb.v1 import chat_pb2, embedding_pb2, rerank_pb2, retrieval_pb2

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
In_contra = TypeVar("In_contra", contravariant=True)
Out_co = TypeVar("Out_co", covariant=True)

REQUEST = "$request"
"""The key under which a source node's ``prepare`` finds the run's request."""


class UnaryCall(Protocol[In_contra, Out_co]):
    """One request, one reply within ``timeout`` seconds: a typed client's unary method."""

    def __call__(self, request: In_contra, /, *, timeout: float) -> Awaitable[Out_co]: ...


class StreamCall(Protocol[In_contra, Out_co]):
    """One request, a stream of chunks that ends within ``timeout`` seconds."""

    def __call__(self, request: In_contra, /, *, timeout: float) -> AsyncIterator[Out_co]: ...


class NodeStatus(enum.IntEnum):
    """How a node ended; the values are those of ``opea.v1.NodeStatus``."""

    OK = 1
    FAILED = 2
    TIMED_OUT = 3
    SKIPPED = 4  # cancelled because the run stopped first


class NodeTiming(typing.NamedTuple):
    """One node of one run; ``started`` is in seconds since the run started. (A named tuple,
    not a frozen dataclass: one is made for every node of every request, at a fifth of the
    cost.)"""

    name: str
    status: NodeStatus
    started: float
    duration: float
    message: str = ""


@dataclass(frozen=True)
class RunResult(Generic[S]):
    outputs: Mapping[str, object]
    state: S
    timings: tuple[NodeTiming, ...]  # in start order
    degraded: bool  # some optional node did not succeed


_INFER: Any = None


@dataclass(frozen=True)
class Node(Generic[S, Req, Resp]):
    """One step of a pipeline.

    ``input_type``/``output_type`` default to the annotations of ``call``. ``prepare(state,
    outputs)`` builds the request from the state and the outputs of the finished predecessors (a
    source finds the run's request under :data:`REQUEST`); ``absorb(state, reply)`` writes the
    reply into the state. ``stream`` serves when the node is the streamed sink of a run.
    ``cache`` answers a request seen before without calling (both types must be protobuf
    messages; see :mod:`opea_grpc.cache`).

    >>> Node("chat", chat.chat, stream=chat.chat_stream, timeout=30.0, prepare=ground)
    """

    name: str
    call: UnaryCall[Req, Resp]
    _: KW_ONLY
    stream: StreamCall[Req, Any] | None = None
    input_type: type[Req] = _INFER
    output_type: type[Resp] = _INFER
    timeout: float = 10.0
    optional: bool = False  # on failure or timeout, the run goes on without it
    prepare: Callable[[S, Mapping[str, object]], Req] | None = None
    absorb: Callable[[S, Resp], None] | None = None
    cache: Cache | None = None
    #: The call keeps its own deadline (a typed client's gRPC deadline), so the run sets no
    #: timer of its own around it: the ``deadline_bound`` attribute of the call or its owner.
    self_bounded: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        if not self.name or self.name == REQUEST:
            raise GraphError(f"a node cannot be named {self.name!r}")
        if not self.timeout > 0:
            raise GraphError(f"node {self.name!r}: timeout must be positive, not {self.timeout}")
        given: dict[str, object] = {"input_type": self.input_type, "output_type": self.output_type}
        for (attribute, value), inferred in zip(given.items(), _call_types(self.call), strict=True):
            if value is None and inferred is None:
                raise GraphError(
                    f"node {self.name!r}: cannot infer {attribute} from the annotations of its"
                    f" call; pass {attribute}= explicitly"
                )
            if value is None:
                object.__setattr__(self, attribute, inferred)
        bounded = _deadline_bound(self.call) and (
            self.stream is None or _deadline_bound(self.stream)
        )
        object.__setattr__(self, "self_bounded", bounded)
        if self.cache is not None and not (
            issubclass(self.input_type, Message) and issubclass(self.output_type, Message)
        ):
            raise GraphError(
                f"node {self.name!r}: a cache keys protobuf requests to protobuf replies, not"
                f" {type_name(self.input_type)} to {type_name(self.output_type)}"
            )


def _deadline_bound(call: object) -> bool:
    owner = getattr(call, "__self__", None)
    return bool(getattr(call, "deadline_bound", False) or getattr(owner, "deadline_bound", False))


def _call_types(call: Callable[..., object]) -> tuple[type | None, type | None]:
    """The classes of ``call``'s first positional parameter and of what it returns (or awaits)."""
    try:
        hints = typing.get_type_hints(call if inspect.isroutine(call) else type(call).__call__)
        params = inspect.signature(call).parameters
    except (NameError, TypeError, ValueError):
        return None, None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    first = next((p.name for p in params.values() if p.kind in positional), "")
    accepted, returned = hints.get(first), hints.get("return")
    if typing.get_origin(returned) in (Awaitable, Coroutine):
        returned = typing.get_args(returned)[-1]
    return (
        accepted if isinstance(accepted, type) else None,
        returned if isinstance(returned, type) else None,
    )


def type_name(cls: type) -> str:
    """How messages name a node's type: the protobuf full name, else the qualified name."""
    if issubclass(cls, Message):
        return str(cls.DESCRIPTOR.full_name)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _embed_to_search(reply: embedding_pb2.EmbedResponse) -> retrieval_pb2.SearchRequest:
    if not reply.data:
        raise ServiceError(grpc.StatusCode.INTERNAL, "the embedding reply holds no vector")
    return retrieval_pb2.SearchRequest(vector=reply.data[0].embedding)


def _search_to_rerank(reply: retrieval_pb2.SearchResponse) -> rerank_pb2.RerankRequest:
    # The reply does not carry the query: a prepare hook sets it from the state.
    return rerank_pb2.RerankRequest(documents=[hit.document for hit in reply.documents])


def _rerank_to_chat(reply: rerank_pb2.RerankResponse) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(documents=[result.document for result in reply.results])


def _search_to_chat(reply: retrieval_pb2.SearchResponse) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(documents=[hit.document for hit in reply.documents])


BUILTIN_ADAPTERS: Mapping[tuple[type, type], Callable[[Any], Any]] = MappingProxyType(
    {
        (embedding_pb2.EmbedResponse, retrieval_pb2.SearchRequest): _embed_to_search,
        (retrieval_pb2.SearchResponse, rerank_pb2.RerankRequest): _search_to_rerank,
        (rerank_pb2.RerankResponse, chat_pb2.ChatRequest): _rerank_to_chat,
        (retrieval_pb2.SearchResponse, chat_pb2.ChatRequest): _search_to_chat,
    }
)
"""How one reply of the ChatQnA chain becomes the next request, by (output, input) type."""
