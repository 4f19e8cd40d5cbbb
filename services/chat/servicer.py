"""``opea.v1.ChatService``: checks the request, asks the backend, answers in proto.

A stream has the shape chat.proto promises: the first chunk carries ``role`` ASSISTANT, then
content deltas; the last content chunk (or an empty one) carries ``finish_reason``; the final
chunk carries ``usage`` only. Every chunk carries the completion's ``id``, ``model`` and
``created``. Nothing is sent before the backend has produced something, so a backend that
fails at once fails the call with its status and no half-sent stream.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from opea_grpc import Context, telemetry
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from services.chat.backend import ChatBackend, Finish, Message, Prompt, TokenUsage

_INVALID = grpc.StatusCode.INVALID_ARGUMENT

ROLES: Mapping[chat_pb2.Role.ValueType, str] = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
    chat_pb2.ROLE_DEVELOPER: "developer",
}
FINISH_REASONS: Mapping[Finish, chat_pb2.FinishReason.ValueType] = {
    Finish.STOP: chat_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    Finish.CONTENT_FILTER: chat_pb2.FINISH_REASON_CONTENT_FILTER,
    Finish.TOOL_CALLS: chat_pb2.FINISH_REASON_TOOL_CALLS,
}
#: Inclusive bounds of the optional sampling fields, as OpenAI's.
RANGES: Mapping[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
#: OpenAI's limit on stop sequences.
MAX_STOP = 4


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits, each named by the variable that sets it in the error messages."""

    max_messages: int = 256
    max_message_chars: int = 100_000
    max_documents: int = 64
    max_document_chars: int = 100_000


def _usage(usage: TokenUsage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _too_many(what: str, count: int, limit: int, variable: str) -> ServiceError:
    return ServiceError(
        _INVALID, f"{what}: {count} given, at most {limit} allowed (OPEA_CHAT_{variable})"
    )


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Validates a ChatRequest, turns it into a :class:`Prompt`, relays the backend's answer."""

    def __init__(self, backend: ChatBackend, limits: Limits | None = None) -> None:
        self._backend = backend
        self._limits = limits if limits is not None else Limits()

    # -- checks ------------------------------------------------------------------------------

    def _check_messages(self, request: chat_pb2.ChatRequest) -> None:
        limits = self._limits
        if not request.messages:
            raise ServiceError(_INVALID, "messages is empty: send at least one ROLE_USER message")
        if len(request.messages) > limits.max_messages:
            raise _too_many("messages", len(request.messages), limits.max_messages, "MAX_MESSAGES")
        for i, message in enumerate(request.messages):
            if message.role not in ROLES:
                name = chat_pb2.Role.Name(message.role) if message.role == 0 else message.role
                raise ServiceError(
                    _INVALID,
                    f"messages[{i}].role is {name}: set one of "
                    + ", ".join(chat_pb2.Role.Name(r) for r in ROLES),
                )
            if len(message.content) > limits.max_message_chars:
                raise ServiceError(
                    _INVALID,
                    f"messages[{i}].content has {len(message.content)} characters, at most "
                    f"{limits.max_message_chars} allowed (OPEA_CHAT_MAX_MESSAGE_CHARS)",
                )
        if all(m.role != chat_pb2.ROLE_USER for m in request.messages):
            raise ServiceError(
                _INVALID, "messages has no ROLE_USER message: the question must come from a user"
            )

    def _check_sampling(self, request: chat_pb2.ChatRequest) -> None:
        for field, (low, high) in RANGES.items():
            if request.HasField(field):  # type: ignore[arg-type]
                value = getattr(request, field)
                if not low <= value <= high:  # NaN fails too
                    raise ServiceError(
                        _INVALID, f"{field} must be within {low:g}..{high:g}, got {value:.7g}"
                    )
        if request.HasField("max_tokens") and request.max_tokens < 1:
            raise ServiceError(
                _INVALID, f"max_tokens must be >= 1, got {request.max_tokens}; or leave it unset"
            )
        if len(request.stop) > MAX_STOP:
            raise ServiceError(
                _INVALID, f"stop: {len(request.stop)} sequences given, at most {MAX_STOP} allowed"
            )
        for i, stop in enumerate(request.stop):
            if not stop:
                raise ServiceError(_INVALID, f"stop[{i}] is empty: remove it or give a sequence")

    def _check_documents(self, request: chat_pb2.ChatRequest) -> None:
        limits = self._limits
        if len(request.documents) > limits.max_documents:
            raise _too_many(
                "documents", len(request.documents), limits.max_documents, "MAX_DOCUMENTS"
            )
        for i, document in enumerate(request.documents):
            if not document.text.strip():
                raise ServiceError(_INVALID, f"documents[{i}].text is empty: send its text")
            if len(document.text) > limits.max_document_chars:
                raise ServiceError(
                    _INVALID,
                    f"documents[{i}].text has {len(document.text)} characters, at most "
                    f"{limits.max_document_chars} allowed (OPEA_CHAT_MAX_DOCUMENT_CHARS)",
                )

    def prompt(self, request: chat_pb2.ChatRequest) -> Prompt:
        """The checked request as the backend takes it; ServiceError says what is wrong."""
        model = self._backend.model
        if request.model and request.model != model:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here; this service serves {model!r} "
                "(or leave model empty)",
            )
        self._check_messages(request)
        self._check_sampling(request)
        self._check_documents(request)

        def optional(field: str) -> float | None:
            return getattr(request, field) if request.HasField(field) else None  # type: ignore[arg-type]

        return Prompt(
            model=model,
            messages=tuple(Message(ROLES[m.role], m.content, m.name) for m in request.messages),
            documents=tuple(d.text for d in request.documents),
            temperature=optional("temperature"),
            top_p=optional("top_p"),
            max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
            seed=request.seed if request.HasField("seed") else None,
            presence_penalty=optional("presence_penalty"),
            frequency_penalty=optional("frequency_penalty"),
            stop=tuple(request.stop),
            user=request.user,
        )

    # -- methods -----------------------------------------------------------------------------

    async def Chat(self, request: chat_pb2.ChatRequest, context: Context) -> chat_pb2.ChatResponse:
        prompt = self.prompt(request)
        completion = await self._backend.complete(prompt)
        _annotate(prompt, completion.usage)
        return chat_pb2.ChatResponse(
            id=f"chatcmpl-{secrets.token_hex(12)}",
            model=prompt.model,
            created=int(time.time()),
            message=chat_pb2.ChatMessage(role=chat_pb2.ROLE_ASSISTANT, content=completion.content),
            finish_reason=FINISH_REASONS[completion.finish],
            usage=_usage(completion.usage),
        )

    async def ChatStream(
        self, request: chat_pb2.ChatStreamRequest, context: Context
    ) -> AsyncIterator[chat_pb2.ChatStreamResponse]:
        prompt = self.prompt(request.request)
        chunk_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        usage = TokenUsage()
        first, finished = True, False
        async with aclosing(self._backend.stream(prompt)) as pieces:
            async for piece in pieces:
                if isinstance(piece, TokenUsage):
                    usage = piece
                    continue
                if finished or (not first and not piece.content and piece.finish is None):
                    continue
                yield chat_pb2.ChatStreamResponse(
                    id=chunk_id,
                    model=prompt.model,
                    created=created,
                    role=chat_pb2.ROLE_ASSISTANT if first else chat_pb2.ROLE_UNSPECIFIED,
                    content=piece.content,
                    finish_reason=(
                        FINISH_REASONS[piece.finish]
                        if piece.finish is not None
                        else chat_pb2.FINISH_REASON_UNSPECIFIED
                    ),
                )
                first, finished = False, piece.finish is not None
        if not finished:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "the model's stream ended without a finish reason: the answer may be cut short",
            )
        _annotate(prompt, usage)
        yield chat_pb2.ChatStreamResponse(
            id=chunk_id, model=prompt.model, created=created, usage=_usage(usage)
        )


def _annotate(prompt: Prompt, usage: TokenUsage) -> None:
    """The model and its token counts, on the call's span (GenAI semantic conventions)."""
    telemetry.annotate(
        {
            "gen_ai.request.model": prompt.model,
            "gen_ai.usage.input_tokens": usage.prompt_tokens,
            "gen_ai.usage.output_tokens": usage.completion_tokens,
        }
    )
