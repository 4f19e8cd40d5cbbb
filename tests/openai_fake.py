"""An OpenAI-protocol server on loopback, for testing the backends that call one.

Serves ``/v1/embeddings``, ``/v1/chat/completions`` (plain and SSE-streamed, with usage),
``/v1/rerank`` (Cohere/Jina/vLLM shape), ``/rerank`` (TEI shape) and ``/v1/models``. It records
every request, can be told to fail the next calls with given statuses, can hold a stream after
its first chunk, and notes when a client went away mid-stream.

>>> async with FakeOpenAI() as fake:
...     fake.base_url  # "http://127.0.0.1:PORT"
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DIMENSIONS = 8
WORD = re.compile(r"\w+")


def fake_vector(text: str) -> list[float]:
    """A deterministic unit vector for ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:DIMENSIONS]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@dataclass
class Failure:
    status: int
    message: str = "injected failure"
    retry_after: str | None = None


@dataclass
class FakeOpenAI:
    model: str = "fake-model"
    #: Answer for chat; defaults to an echo of the last user message.
    answer: str | None = None
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    failures: collections.deque[Failure] = field(default_factory=collections.deque)
    #: When set, a stream sends its first chunk, then waits for this event.
    hold: asyncio.Event | None = None
    #: Set when a client disconnected before a stream ended.
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    stream_finished: asyncio.Event = field(default_factory=asyncio.Event)
    base_url: str = ""
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    def fail(self, *statuses: int, retry_after: str | None = None) -> None:
        """Answer the next calls with these HTTP statuses, in order."""
        self.failures.extend(Failure(s, retry_after=retry_after) for s in statuses)

    async def __aenter__(self) -> FakeOpenAI:
        app = Starlette(
            routes=[
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/rerank", self._rerank, methods=["POST"]),
                Route("/rerank", self._tei_rerank, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
            await asyncio.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 10)

    async def _record(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        body = await request.json() if request.method == "POST" else {}
        self.requests.append((request.url.path, body))
        self.headers.append(dict(request.headers))
        if self.failures:
            failure = self.failures.popleft()
            headers = {"retry-after": failure.retry_after} if failure.retry_after else None
            error = {"error": {"message": failure.message, "type": "fake", "code": None}}
            return body, JSONResponse(error, status_code=failure.status, headers=headers)
        return body, None

    async def _models(self, request: Request) -> Response:
        _, failed = await self._record(request)
        return failed or JSONResponse(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]}
        )

    async def _embeddings(self, request: Request) -> Response:
        body, failed = await self._record(request)
        if failed:
            return failed
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(len(words(t)) for t in inputs)
        return JSONResponse(
            {
                "object": "list",
                "model": body.get("model") or self.model,
                "data": [
                    {"object": "embedding", "index": i, "embedding": fake_vector(t)}
                    for i, t in enumerate(inputs)
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _reply(self, body: dict[str, Any]) -> str:
        if self.answer is not None:
            return self.answer
        users = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
        return f"echo: {users[-1] if users else ''}"

    async def _chat(self, request: Request) -> Response:
        body, failed = await self._record(request)
        if failed:
            return failed
        answer = self._reply(body)
        prompt = sum(len(words(str(m.get("content", "")))) for m in body.get("messages", []))
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(words(answer)),
            "total_tokens": prompt + len(words(answer)),
        }
        model = body.get("model") or self.model
        created = int(time.time())
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        pieces = re.findall(r"\S+\s*", answer) or [""]
        return StreamingResponse(
            self._chunks(model, created, pieces, usage if include_usage else None),
            media_type="text/event-stream",
        )

    async def _chunks(
        self, model: str, created: int, pieces: list[str], usage: dict[str, int] | None
    ) -> AsyncIterator[str]:
        def frame(delta: dict[str, str], finish: str | None) -> str:
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            yield frame({"role": "assistant", "content": ""}, None)
            for i, piece in enumerate(pieces):
                yield frame({"content": piece}, None)
                if i == 0 and self.hold is not None:
                    await self.hold.wait()
            yield frame({}, "stop")
            if usage is not None:
                tail = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
            self.stream_finished.set()
        except (asyncio.CancelledError, GeneratorExit):
            self.disconnected.set()
            raise

    def _scores(self, query: str, texts: list[str]) -> list[float]:
        q = set(words(query))
        return [len(q & set(words(t))) / (1 + len(words(t))) for t in texts]

    async def _rerank(self, request: Request) -> Response:
        body, failed = await self._record(request)
        if failed:
            return failed
        texts = [d if isinstance(d, str) else d["text"] for d in body["documents"]]
        scores = self._scores(body["query"], texts)
        order = sorted(range(len(texts)), key=lambda i: -scores[i])[: body.get("top_n") or None]
        return JSONResponse(
            {
                "model": body.get("model") or self.model,
                "results": [
                    {"index": i, "relevance_score": scores[i], "document": {"text": texts[i]}}
                    for i in order
                ],
                "usage": {"total_tokens": sum(len(words(t)) for t in texts)},
            }
        )

    async def _tei_rerank(self, request: Request) -> Response:
        body, failed = await self._record(request)
        if failed:
            return failed
        scores = self._scores(body["query"], body["texts"])
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return JSONResponse([{"index": i, "score": scores[i]} for i in order])
