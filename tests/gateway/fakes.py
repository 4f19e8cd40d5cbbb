"""A chat backend the tests script: behind the chat service's backend Protocol, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from services.chat.backend import Completion, Delta, Finish, Prompt, TokenUsage

MODEL = "scripted-chat"


@dataclass
class ScriptedChat:
    """Answers with ``tokens``; may hold after the first token, fail, or hang.

    ``released`` gates every token after the first; ``produced`` counts tokens handed out;
    ``closed`` is set when a stream is closed before it ended (the caller went away).
    """

    tokens: list[str] = field(default_factory=lambda: [f"t{i} " for i in range(8)])
    fail: BaseException | None = None
    fail_midway: BaseException | None = None
    hang: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    produced: int = 0
    prompts: list[Prompt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.released.set()

    @property
    def model(self) -> str:
        return MODEL

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    def _usage(self, prompt: Prompt) -> TokenUsage:
        return TokenUsage(len(prompt.question.split()), len(self.tokens))

    async def complete(self, prompt: Prompt) -> Completion:
        self.prompts.append(prompt)
        self.started.set()
        if self.fail is not None:
            raise self.fail
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.closed.set()
                raise
        self.produced = len(self.tokens)
        return Completion("".join(self.tokens), Finish.STOP, self._usage(prompt))

    async def stream(self, prompt: Prompt) -> AsyncGenerator[Delta | TokenUsage, None]:
        self.prompts.append(prompt)
        self.started.set()
        ended = False
        try:
            if self.fail is not None:
                raise self.fail
            for i, token in enumerate(self.tokens):
                if i:
                    await self.released.wait()
                if self.hang and i:
                    await asyncio.Event().wait()
                if self.fail_midway is not None and i == 2:
                    raise self.fail_midway
                self.produced += 1
                last = i == len(self.tokens) - 1
                yield Delta(token, Finish.STOP if last else None)
            ended = True
            yield self._usage(prompt)
        finally:
            if not ended:
                self.closed.set()
