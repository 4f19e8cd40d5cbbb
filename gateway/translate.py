"""Pure translation between the REST models (OpenAI's shapes) and the ``opea.v1`` messages.

Requests go in as validated pydantic models and come out as protobuf; replies go in as protobuf
and come out as plain dicts ready for ``orjson.dumps``. No I/O, no state.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf import struct_pb2

from gateway import schemas
from gateway.megaservice import Answer
from opea_grpc.node import NodeStatus, NodeTiming
from opea_grpc.pb.v1 import (
    chat_pb2,
    chatqna_pb2,
    common_pb2,
    embedding_pb2,
    rerank_pb2,
)
from opea_grpc.structs import struct_to_dict

_INVALID = grpc.StatusCode.INVALID_ARGUMENT

ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "tool": chat_pb2.ROLE_TOOL,
    "developer": chat_pb2.ROLE_DEVELOPER,
}
FINISH = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    chat_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
OPERATORS = {
    "eq": common_pb2.OPERATOR_EQ,
    "ne": common_pb2.OPERATOR_NE,
    "gt": common_pb2.OPERATOR_GT,
    "gte": common_pb2.OPERATOR_GTE,
    "lt": common_pb2.OPERATOR_LT,
    "lte": common_pb2.OPERATOR_LTE,
    "in": common_pb2.OPERATOR_IN,
    "not_in": common_pb2.OPERATOR_NOT_IN,
}
STATUS = {
    NodeStatus.OK: "ok",
    NodeStatus.FAILED: "failed",
    NodeStatus.TIMED_OUT: "timed_out",
    NodeStatus.SKIPPED: "skipped",
}


# -- requests ----------------------------------------------------------------------------------


def messages(items: Sequence[schemas.Message]) -> list[chat_pb2.ChatMessage]:
    return [
        chat_pb2.ChatMessage(role=ROLES[m.role], content=m.text(), name=m.name or "") for m in items
    ]


def _stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else stop


def value(item: object) -> struct_pb2.Value:
    """A JSON value (null, bool, number, string, list, object) as a protobuf ``Value``."""
    holder = struct_pb2.Struct()
    holder.update({"v": item})  # type: ignore[dict-item]
    return holder.fields["v"]


def filter_of(conditions: Iterable[schemas.Condition] | None) -> common_pb2.Filter | None:
    if conditions is None:
        return None
    return common_pb2.Filter(
        conditions=[
            common_pb2.Condition(key=c.key, operator=OPERATORS[c.op], value=value(c.value))
            for c in conditions
        ]
    )


def chat_request(
    req: schemas.ChatCompletionRequest | schemas.ChatQnARequest, model: str
) -> chat_pb2.ChatRequest:
    """The ``opea.v1.ChatRequest`` of a chat completion (or OPEA ChatQnA) request."""
    items = (
        [schemas.Message(role="user", content=req.messages)]
        if isinstance(req.messages, str)
        else req.messages
    )
    out = chat_pb2.ChatRequest(model=model, messages=messages(items), stop=_stop(req.stop))
    max_tokens = req.max_tokens
    if isinstance(req, schemas.ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is not None:
        out.max_tokens = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            setattr(out, name, value)
    if req.user:
        out.user = req.user
    return out


def ask_request(req: schemas.ChatCompletionRequest) -> chatqna_pb2.AskRequest:
    """The ``opea.v1.AskRequest`` of a chat completion request."""
    out = chatqna_pb2.AskRequest(chat=chat_request(req, req.model))
    rag = req.opea
    if rag is not None:
        options = out.rag
        options.disable_retrieval = not rag.retrieval
        options.disable_rerank = not rag.rerank
        if rag.collection:
            options.collection = rag.collection
        if rag.top_k is not None:
            options.top_k = rag.top_k
        if rag.top_n is not None:
            options.top_n = rag.top_n
        conditions = filter_of(rag.filter)
        if conditions is not None:
            options.filter.CopyFrom(conditions)
    return out


def chatqna_request(req: schemas.ChatQnARequest, model: str) -> chatqna_pb2.AskRequest:
    """The ``opea.v1.AskRequest`` of OPEA's ChatQnA request shape."""
    out = chatqna_pb2.AskRequest(chat=chat_request(req, req.model or model))
    if req.k is not None:
        out.rag.top_k = req.k
    if req.top_n is not None:
        out.rag.top_n = req.top_n
    return out


# -- replies -----------------------------------------------------------------------------------


def usage(u: common_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def sources(found: Iterable[common_pb2.ScoredDocument]) -> list[dict[str, Any]]:
    return [
        {
            "id": hit.document.id,
            "text": hit.document.text,
            "score": hit.score,
            "metadata": struct_to_dict(hit.document.metadata),
        }
        for hit in found
    ]


def nodes(timings: Iterable[NodeTiming]) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "status": STATUS[t.status],
            "duration_ms": round(t.duration * 1000, 3),
            "message": t.message,
        }
        for t in timings
    ]


def server_timing(timings: Iterable[NodeTiming], total: float | None = None) -> str:
    """The ``Server-Timing`` header: one metric per node, durations in milliseconds."""
    parts = [f'{t.name};dur={t.duration * 1000:.3f};desc="{STATUS[t.status]}"' for t in timings]
    if total is not None:
        parts.append(f"total;dur={total * 1000:.3f}")
    return ", ".join(parts)


def completion(answer: Answer) -> dict[str, Any]:
    reply = answer.response
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.message.content},
                "logprobs": None,
                "finish_reason": FINISH.get(reply.finish_reason, "stop"),
            }
        ],
        "usage": usage(reply.usage),
        "opea": {
            "sources": sources(answer.sources),
            "nodes": nodes(answer.timings),
            "degraded": answer.degraded,
        },
    }


def chunk(piece: chat_pb2.ChatStreamResponse, include_usage: bool) -> dict[str, Any] | None:
    """The ``chat.completion.chunk`` of one chat stream message (None: nothing to send)."""
    if piece.HasField("usage"):
        if not include_usage:
            return None
        return {
            "id": piece.id,
            "object": "chat.completion.chunk",
            "created": piece.created,
            "model": piece.model,
            "choices": [],
            "usage": usage(piece.usage),
        }
    delta: dict[str, str] = {}
    if piece.role == chat_pb2.ROLE_ASSISTANT:
        delta["role"] = "assistant"
    delta["content"] = piece.content
    out: dict[str, Any] = {
        "id": piece.id,
        "object": "chat.completion.chunk",
        "created": piece.created,
        "model": piece.model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": FINISH.get(piece.finish_reason),
            }
        ],
    }
    if include_usage:
        out["usage"] = None
    return out


def embedding_input(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def embeddings(reply: embedding_pb2.EmbedResponse, encoding: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for item in reply.data:
        vector: list[float] | str
        if encoding == "base64":
            array = np.asarray(item.embedding, dtype="<f4")
            vector = base64.b64encode(array.tobytes()).decode("ascii")
        else:
            vector = list(item.embedding)
        data.append({"object": "embedding", "index": item.index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": reply.model,
        "usage": {
            "prompt_tokens": reply.usage.prompt_tokens,
            "total_tokens": reply.usage.total_tokens,
        },
    }


def rerank_request(req: schemas.RerankRequest) -> rerank_pb2.RerankRequest:
    texts = [d if isinstance(d, str) else d.text for d in req.documents]
    out = rerank_pb2.RerankRequest(
        query=req.query,
        documents=[common_pb2.Document(text=t) for t in texts],
        model=req.model or "",
    )
    if req.top_n is not None:
        out.top_n = req.top_n
    return out


def reranked(
    reply: rerank_pb2.RerankResponse, request: rerank_pb2.RerankRequest, with_documents: bool
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for r in reply.results:
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.relevance_score}
        if with_documents:
            item["document"] = {"text": request.documents[r.index].text}
        results.append(item)
    return {
        "id": f"rerank-{id(reply):x}",
        "model": reply.model,
        "results": results,
        "usage": usage(reply.usage),
    }


def model_cards(models: Iterable[common_pb2.Model]) -> list[dict[str, Any]]:
    return [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
        for m in models
    ]
