"""``openai``: any OpenAI-compatible ``/v1/chat/completions`` server.

vLLM, TGI, Ollama, llama.cpp's server and OpenAI itself speak it. A :class:`Prompt` becomes
the JSON body (:func:`payload`): roles as strings, each sampling field only when the caller set
it (so an explicit 0 reaches the server as 0), the context passages in a system message
numbered ``[1]``, ``[2]`` ... by a configurable template. Streams ask for
``stream_options.include_usage`` and are relayed event by event as they arrive; closing the
stream closes the HTTP response, which tells the engine to stop generating.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

import grpc

from opea_grpc.errors import ServiceError
from services.chat.backend import Completion, Delta, Finish, Prompt, TokenUsage
from services.upstream import Upstream

PATH = "/v1/chat/completions"
DEFAULT_CONTEXT_TEMPLATE = (
    "Answer the user's question from the numbered context passages below, and cite the "
    "passages you use as [n]. If they do not contain the answer, say so.\n\n{context}"
)

_FINISH = {
    "length": Finish.LENGTH,
    "content_filter": Finish.CONTENT_FILTER,
    "tool_calls": Finish.TOOL_CALLS,
    "function_call": Finish.TOOL_CALLS,
}


def finish_of(value: object) -> Finish | None:
    """OpenAI's ``finish_reason``: None while the answer goes on; unknown reasons are STOP
    (TGI's ``eos_token`` and ``stop_sequence``, for one)."""
    if value is None:
        return None
    return _FINISH.get(str(value), Finish.STOP)


def usage_of(value: object) -> TokenUsage | None:
    """OpenAI's ``usage`` object, or None when there is none."""
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return TokenUsage(prompt, completion)


def context_message(template: str, documents: Sequence[str]) -> str:
    """The system text that carries the passages: ``{context}`` in ``template`` replaced by
    ``[1] first passage``, a blank line, ``[2] second passage`` ..."""
    block = "\n\n".join(f"[{n}] {text}" for n, text in enumerate(documents, 1))
    return template.replace("{context}", block)


def _number(value: float) -> float:
    # A proto float is 32-bit: 0.7 arrives as 0.699999988. Seven digits give back what was meant.
    return float(f"{value:.7g}")


def payload(prompt: Prompt, *, context_template: str, stream: bool) -> dict[str, Any]:
    """The JSON body of a chat completion request for ``prompt``."""
    messages: list[dict[str, str]] = []
    for message in prompt.messages:
        item = {"role": message.role, "content": message.content}
        if message.name:
            item["name"] = message.name
        messages.append(item)
    if prompt.documents:
        context = context_message(context_template, prompt.documents)
        # One system message at the top: some chat templates refuse a second one, or one later.
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{context}"}
        else:
            messages.insert(0, {"role": "system", "content": context})
    body: dict[str, Any] = {"model": prompt.model, "messages": messages}
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(prompt, key)
        if value is not None:
            body[key] = _number(value)
    if prompt.max_tokens is not None:
        body["max_tokens"] = prompt.max_tokens
    if prompt.seed is not None:
        body["seed"] = prompt.seed
    if prompt.stop:
        body["stop"] = list(prompt.stop)
    if prompt.user:
        body["user"] = prompt.user
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _malformed(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, f"upstream {PATH} sent {what}")


def parse_completion(body: Any) -> Completion:
    """A non-streamed reply: the first choice's message, its finish reason, the usage."""
    try:
        choice = body["choices"][0]
        content = choice["message"].get("content") or ""
        finish = finish_of(choice.get("finish_reason")) or Finish.STOP
    except (KeyError, IndexError, TypeError, AttributeError):
        raise _malformed("a reply without choices[0].message") from None
    if not isinstance(content, str):
        raise _malformed("a message whose content is not text")
    return Completion(content, finish, usage_of(body.get("usage")) or TokenUsage())


def parse_event(event: Any) -> list[Delta | TokenUsage]:
    """What one streamed chunk carries: a delta of the first choice, usage, or both."""
    if not isinstance(event, dict):
        raise _malformed(f"an event that is not an object: {event!r:.100}")
    out: list[Delta | TokenUsage] = []
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        text = content if isinstance(content, str) else ""
        out.append(Delta(text, finish_of(choice.get("finish_reason"))))
    usage = usage_of(event.get("usage"))
    if usage is not None:
        out.append(usage)
    return out


class UpstreamChat:
    """Completions from an upstream server; ready while it answers."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        model: str,
        context_template: str = DEFAULT_CONTEXT_TEMPLATE,
    ) -> None:
        self._upstream = upstream
        self._model = model
        self._template = context_template

    @property
    def model(self) -> str:
        return self._model

    async def start(self) -> None:
        await self._upstream.start()

    async def close(self) -> None:
        await self._upstream.close()

    async def ready(self) -> bool:
        return await self._upstream.reachable("/v1/models")

    async def complete(self, prompt: Prompt) -> Completion:
        body = payload(prompt, context_template=self._template, stream=False)
        return parse_completion(await self._upstream.post(PATH, body))

    async def stream(self, prompt: Prompt) -> AsyncGenerator[Delta | TokenUsage, None]:
        body = payload(prompt, context_template=self._template, stream=True)
        async with aclosing(self._upstream.stream(PATH, body)) as events:
            async for event in events:
                for item in parse_event(event):
                    yield item
