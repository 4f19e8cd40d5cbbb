"""``extractive``: a grounded answerer with no language model.

It answers the last user message from the request's context passages only. Each passage is
split into sentences; each sentence is scored with BM25 against the question's terms (the
sentences of all passages are the collection), times a small bonus for earlier passages, which
come ranked. The best few sentences (at most ``max_sentences``, none scoring below half of
the best) are quoted verbatim in passage order, each followed by ``[n]``, the 1-based position
of its passage in the request::

    Paris is the capital of France. [1] The Eiffel Tower stands on the Champ de Mars. [3]

With no passages it answers "I have no context passages to answer from."; when no sentence
shares a term with the question, "None of the provided passages answers this question."

Tokens: one regex tokenizer counts everything, ``\\w+|[^\\w\\s]`` (each run of letters or
digits is a token, and so is each other non-space character). ``prompt_tokens`` counts the
contents of every message plus every passage; ``completion_tokens`` counts the answer. A
``max_tokens`` limit cuts the answer after that many tokens (finish LENGTH); a ``stop``
sequence cuts it where the sequence starts (finish STOP), as a model's would.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence

from services import bm25
from services.chat.backend import Completion, Delta, Finish, Prompt, TokenUsage

MODEL = "extractive-answerer"
NO_CONTEXT = "I have no context passages to answer from."
NO_ANSWER = "None of the provided passages answers this question."

TOKEN = re.compile(r"\w+|[^\w\s]")
#: Streamed pieces: a word with the space after it (a leading space stays with the first one).
_PIECE = re.compile(r"\s*\S+\s*|\s+")
#: Sentence ends: terminal punctuation (and closing quotes or brackets) before a space, or a
#: line break.
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)|\n")
_WORD_BEFORE = re.compile(r"[\w.]*$")
#: A markdown heading line: a title, not a statement worth quoting as an answer.
_HEADING = re.compile(r"#{1,6}\s")
_ABBREVIATIONS = frozenset(
    {"al", "approx", "cf", "dr", "e.g", "etc", "fig", "i.e", "inc", "jr", "ltd", "mr", "mrs"}
    | {"ms", "prof", "sr", "st", "vs"}
)
#: Earlier passages come ranked higher: passage p (0-based) scores x (1 + EARLY_BONUS / (p + 1)).
EARLY_BONUS = 0.1
#: Sentences scoring below this fraction of the best one are left out.
RELATIVE_FLOOR = 0.5


def count_tokens(text: str) -> int:
    """Tokens of ``text`` by this backend's tokenizer (see the module docstring)."""
    return len(TOKEN.findall(text))


def _cut_after_tokens(text: str, limit: int) -> int | None:
    """Where ``text`` ends after ``limit`` tokens; None when it has no more than that."""
    end = 0
    for i, match in enumerate(TOKEN.finditer(text)):
        if i == limit:
            return end
        end = match.end()
    return None


def _is_abbreviation(text: str, dot: int) -> bool:
    if text[dot] != ".":
        return False
    found = _WORD_BEFORE.search(text, max(0, dot - 12), dot)
    word = found.group().lower() if found else ""
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``, without surrounding whitespace."""
    spans: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if any(c.isalnum() for c in text[start:end]):
            spans.append((start, end))

    start = 0
    for boundary in _BOUNDARY.finditer(text):
        if _is_abbreviation(text, boundary.start()):
            continue
        add(start, boundary.end())
        start = boundary.end()
    add(start, len(text))
    return spans


def select(question: str, passages: Sequence[str], max_sentences: int) -> str:
    """The answer: the best sentences, verbatim and cited, or a plain statement of why none."""
    if not passages:
        return NO_CONTEXT
    wanted = set(bm25.terms(question))
    found = [
        (p, passage[start:end])
        for p, passage in enumerate(passages)
        for start, end in sentences(passage)
        if not _HEADING.match(passage, start)
    ]
    if not wanted or not found:
        return NO_ANSWER
    lexical = bm25.scores(wanted, [bm25.terms(text) for _, text in found])
    scores = [s * (1.0 + EARLY_BONUS / (p + 1)) for s, (p, _) in zip(lexical, found, strict=True)]
    best = max(scores)
    if best <= 0:
        return NO_ANSWER
    chosen: list[int] = []
    seen: set[str] = set()
    for i in sorted(range(len(found)), key=lambda i: -scores[i]):  # stable: ties keep order
        if len(chosen) == max_sentences or scores[i] < best * RELATIVE_FLOOR:
            break
        key = " ".join(found[i][1].lower().split())
        if key not in seen:
            seen.add(key)
            chosen.append(i)
    return " ".join(f"{found[i][1]} [{found[i][0] + 1}]" for i in sorted(chosen))


def limit(text: str, max_tokens: int | None, stop: Sequence[str]) -> tuple[str, Finish]:
    """``text`` cut at ``max_tokens`` tokens (LENGTH), then before the first stop (STOP)."""
    finish = Finish.STOP
    if max_tokens is not None:
        cut = _cut_after_tokens(text, max_tokens)
        if cut is not None:
            text, finish = text[:cut], Finish.LENGTH
    starts = [i for s in stop if (i := text.find(s)) >= 0]
    if starts:
        text, finish = text[: min(starts)], Finish.STOP
    return text, finish


class ExtractiveAnswerer:
    """Quotes the context passages; no model, no I/O.

    A request whose messages and passages exceed ``offload_chars`` characters is answered in a
    worker thread, so the event loop keeps serving other calls.
    """

    def __init__(self, *, max_sentences: int = 3, offload_chars: int = 32768) -> None:
        self._max_sentences = max_sentences
        self._offload_chars = offload_chars

    @property
    def model(self) -> str:
        return MODEL

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    def answer(self, prompt: Prompt) -> Completion:
        """The completion, computed on the calling thread."""
        text = select(prompt.question, prompt.documents, self._max_sentences)
        text, finish = limit(text, prompt.max_tokens, prompt.stop)
        prompt_tokens = sum(count_tokens(m.content) for m in prompt.messages)
        prompt_tokens += sum(count_tokens(d) for d in prompt.documents)
        return Completion(text, finish, TokenUsage(prompt_tokens, count_tokens(text)))

    async def complete(self, prompt: Prompt) -> Completion:
        size = sum(len(d) for d in prompt.documents) + sum(len(m.content) for m in prompt.messages)
        if size > self._offload_chars:
            return await asyncio.to_thread(self.answer, prompt)
        return self.answer(prompt)

    async def stream(self, prompt: Prompt) -> AsyncGenerator[Delta | TokenUsage, None]:
        """The answer word by word (each with the space after it), then its usage."""
        completion = await self.complete(prompt)
        pieces = _PIECE.findall(completion.content) or [""]
        for piece in pieces[:-1]:
            yield Delta(piece)
        yield Delta(pieces[-1], completion.finish)
        yield completion.usage
