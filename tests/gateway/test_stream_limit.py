"""A stream lasts no longer than its request's deadline: it ends with an error event."""

from __future__ import annotations

import json

import httpx

from tests.gateway.conftest import Stack
from tests.gateway.fakes import MODEL, ScriptedChat

ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Which port is it?"}]}


async def test_a_stream_past_its_deadline_ends_with_an_error_event(
    scripted_stack: tuple[Stack, ScriptedChat],
) -> None:
    stack, backend = scripted_stack
    backend.released.clear()  # the model sends one token, then nothing
    async with (
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
        http.stream(
            "POST", "/v1/chat/completions", json={**ASK, "stream": True, "opea": {"timeout": 0.5}}
        ) as reply,
    ):
        assert reply.status_code == 200
        events = [line[6:] async for line in reply.aiter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events  # no pretended success
    first, last = json.loads(events[0]), json.loads(events[-1])
    assert first["object"] == "chat.completion.chunk"
    assert last["error"]["code"] == "deadline_exceeded", last
    assert backend.produced < len(backend.tokens)
