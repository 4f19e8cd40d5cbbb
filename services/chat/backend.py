"""What a chat backend is, the values it exchanges, and the factory that picks one."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from opea_grpc.config import ConfigError

if TYPE_CHECKING:
    from services.chat.service import Settings

BACKENDS = ("extractive", "openai")


class Finish(str, enum.Enum):
    """Why a completion ended (OpenAI's ``finish_reason`` values)."""

    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True, slots=True)
class Message:
    """One message of the conversation; ``role`` is OpenAI's string (``user``, ``system`` ...)."""

    role: str
    content: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Prompt:
    """A checked chat request. Sampling fields are None when the caller left them unset."""

    model: str
    messages: tuple[Message, ...]
    #: Context passages, cited as [1], [2] ... in this order.
    documents: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    user: str = ""

    @property
    def question(self) -> str:
        """The last user message (the request was checked to have one)."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts; zeros when the backend cannot tell."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer."""

    content: str
    finish: Finish
    usage: TokenUsage


@dataclass(frozen=True, slots=True)
class Delta:
    """The next piece of a streamed answer; ``finish`` is set on the piece that ends it."""

    content: str
    finish: Finish | None = None


class ChatBackend(Protocol):
    """Answers a conversation, whole or as a stream."""

    @property
    def model(self) -> str:
        """The model id this backend answers with."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """Whether a call would be served now (e.g. the upstream answers)."""
        ...

    async def complete(self, prompt: Prompt) -> Completion: ...

    def stream(self, prompt: Prompt) -> AsyncGenerator[Delta | TokenUsage, None]:
        """The answer piece by piece as it is produced, then (when known) its usage.

        Closing the iterator stops the work behind it at once.
        """
        ...


def make_backend(settings: Settings) -> ChatBackend:
    """The backend ``settings.backend`` names (``OPEA_CHAT_BACKEND``)."""
    match settings.backend:
        case "extractive":
            from services.chat.extractive import ExtractiveAnswerer

            return ExtractiveAnswerer(
                max_sentences=settings.max_sentences, offload_chars=settings.offload_chars
            )
        case "openai":
            from services.chat.openai import UpstreamChat
            from services.upstream import upstream_for

            upstream = upstream_for(settings)
            return UpstreamChat(
                upstream, model=settings.model, context_template=settings.context_template
            )
        case other:
            raise ConfigError(
                f"OPEA_CHAT_BACKEND: unknown backend {other!r}; choose one of "
                + ", ".join(BACKENDS)
            )
