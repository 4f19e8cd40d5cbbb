"""The chat service: its settings and how it is assembled.

>>> service = build(ServerConfig(port=0), Settings())        # extractive, offline
>>> port = await service.start()

``opea-grpc serve chat`` (or ``python -m services.chat``) builds it from ``OPEA_CHAT_*``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opea_grpc import models
from opea_grpc.config import ConfigError, ServerConfig
from opea_grpc.pb.v1 import chat_pb2_grpc, common_pb2
from opea_grpc.server import MicroService, ServiceType
from services.chat.backend import ChatBackend, make_backend
from services.chat.extractive import MODEL as EXTRACTIVE_MODEL
from services.chat.openai import DEFAULT_CONTEXT_TEMPLATE
from services.chat.servicer import ChatServicer, Limits

NAME = "chat"
DEFAULT_PORT = 50054


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class Settings:
    """``OPEA_CHAT_<FIELD>`` for each field."""

    #: ``extractive`` (quotes the context passages, no LLM) or ``openai`` (an upstream server).
    backend: str = "extractive"
    #: openai: the upstream's model id (required); extractive answers as extractive-answerer.
    model: str = ""
    #: Most messages in one request, and most characters in one message's content.
    max_messages: int = 256
    max_message_chars: int = 100_000
    #: Most context passages in one request, and most characters in one passage.
    max_documents: int = 64
    max_document_chars: int = 100_000
    #: extractive: most sentences quoted in an answer.
    max_sentences: int = 3
    #: extractive: requests with more characters than this are answered off the event loop.
    offload_chars: int = 32768
    #: openai: the upstream's base URL, e.g. http://vllm:8000 (the /v1/... paths are added).
    base_url: str = ""
    api_key: str = field(default="", repr=False)
    #: openai: the system text that carries the passages; ``{context}`` becomes them, numbered.
    context_template: str = DEFAULT_CONTEXT_TEMPLATE
    #: openai: seconds a call may take, and between two streamed chunks (shortened to the
    #: caller's deadline).
    timeout: float = 120.0
    #: openai: extra attempts on 429/503 and connection failures, first backoff in seconds.
    max_retries: int = 3
    backoff: float = 0.25

    def __post_init__(self) -> None:
        _check(self.max_messages >= 1, "OPEA_CHAT_MAX_MESSAGES must be >= 1")
        _check(self.max_message_chars >= 1, "OPEA_CHAT_MAX_MESSAGE_CHARS must be >= 1")
        _check(self.max_documents >= 0, "OPEA_CHAT_MAX_DOCUMENTS must be >= 0")
        _check(self.max_document_chars >= 1, "OPEA_CHAT_MAX_DOCUMENT_CHARS must be >= 1")
        _check(self.max_sentences >= 1, "OPEA_CHAT_MAX_SENTENCES must be >= 1")
        _check(self.offload_chars >= 0, "OPEA_CHAT_OFFLOAD_CHARS must be >= 0")
        _check(
            "{context}" in self.context_template,
            "OPEA_CHAT_CONTEXT_TEMPLATE must contain {context}, where the passages go",
        )
        _check(self.timeout > 0, "OPEA_CHAT_TIMEOUT must be positive")
        _check(self.max_retries >= 0, "OPEA_CHAT_MAX_RETRIES must be >= 0")
        _check(self.backoff > 0, "OPEA_CHAT_BACKOFF must be positive")
        if self.backend == "extractive":
            _check(
                self.model in ("", EXTRACTIVE_MODEL),
                "OPEA_CHAT_MODEL names the upstream model of backend openai; "
                f"backend extractive serves {EXTRACTIVE_MODEL}, got {self.model!r}",
            )
        if self.backend == "openai":
            _check(
                self.base_url.startswith(("http://", "https://")),
                "OPEA_CHAT_BASE_URL must be the upstream's http:// or https:// URL "
                f"with backend openai, got {self.base_url!r}",
            )
            _check(
                bool(self.model),
                "OPEA_CHAT_MODEL is required with backend openai: the upstream's model id",
            )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_messages=self.max_messages,
            max_message_chars=self.max_message_chars,
            max_documents=self.max_documents,
            max_document_chars=self.max_document_chars,
        )


def build(
    server: ServerConfig, settings: Settings, backend: ChatBackend | None = None
) -> MicroService:
    """The chat MicroService for ``settings`` (or around ``backend``); nothing is opened until
    it starts."""
    backend = backend if backend is not None else make_backend(settings)
    created = int(time.time())
    owner = "opea-grpc" if settings.backend == "extractive" else "upstream"

    def listed() -> list[common_pb2.Model]:
        kind = common_pb2.MODEL_KIND_CHAT
        return [common_pb2.Model(id=backend.model, owned_by=owner, created=created, kind=kind)]

    return (
        MicroService(NAME, service_type=ServiceType.LLM, config=server)
        .add_service(
            chat_pb2_grpc.add_ChatServiceServicer_to_server,
            ChatServicer(backend, settings.limits),
            ready=backend.ready,
        )
        .add_service(models.add_to_server, models.ModelCatalog(listed))
        .on_start(backend.start)
        .on_stop(backend.close)
    )
