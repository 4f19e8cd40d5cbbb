"""The chat service over real gRPC: the contract on every backend that runs here (extractive,
and openai against FakeOpenAI), the extractive answerer's grounding, tokens and limits, the
settings, and the service as a process. The openai backend's own tests: test_chat_openai.py."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
import pytest

from opea_grpc.channel import connect
from opea_grpc.client import ChatClient, ModelClient
from opea_grpc.config import ClientConfig, ConfigError, ServerConfig
from opea_grpc.pb.v1 import chat_pb2, common_pb2
from opea_grpc.retry import RetryBudget
from opea_grpc.testing import started
from services.chat.backend import make_backend
from services.chat.extractive import NO_ANSWER, NO_CONTEXT, count_tokens
from services.chat.service import Settings, build
from tests.openai_fake import FakeOpenAI
from tests.processes import health, served

BACKENDS = ["extractive", "openai"]
SERVICE = ChatClient.SERVICE
NO_RETRY = ClientConfig(max_attempts=1, health_check=False)
USER, SYSTEM, ASSISTANT = chat_pb2.ROLE_USER, chat_pb2.ROLE_SYSTEM, chat_pb2.ROLE_ASSISTANT
UNSPECIFIED = chat_pb2.FINISH_REASON_UNSPECIFIED
ROLE_42 = chat_pb2.Role.ValueType(42)  # from a newer contract, unknown here

PASSAGES = [
    "The Eiffel Tower was completed in 1889. It was built for the World's Fair of that year.",
    "Paris is the capital of France. The city lies on the Seine.",
    "Mount Everest is the highest mountain on Earth. Its summit is 8849 metres high.",
]
QUESTION = "When was the Eiffel Tower completed?"


def message(content: str, role: chat_pb2.Role.ValueType = USER) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(role=role, content=content)


def chat_request(
    question: str = QUESTION, passages: list[str] = PASSAGES, **fields: Any
) -> chat_pb2.ChatRequest:
    fields.setdefault("messages", [message(question)])
    return chat_pb2.ChatRequest(
        documents=[common_pb2.Document(id=f"d{i}", text=t) for i, t in enumerate(passages)],
        **fields,
    )


def settings_for(kind: str, base_url: str, **overrides: object) -> Settings:
    if kind == "extractive":
        settings = Settings()  # needs no upstream: base_url is ignored
    else:
        settings = Settings(backend="openai", base_url=base_url, model="chat-model", backoff=0.01)
    return dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]


@asynccontextmanager
async def running(
    settings: Settings, client_config: ClientConfig | None = None
) -> AsyncIterator[ChatClient]:
    service = build(ServerConfig(host="127.0.0.1", port=0), settings)
    async with started(service, client_config) as channel:
        yield ChatClient(channel, timeout=10, retry_budget=RetryBudget(reserve=0))


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(model="chat-model") as server:
        yield server


@pytest.fixture(params=BACKENDS)
async def client(request: pytest.FixtureRequest) -> AsyncIterator[ChatClient]:
    async with AsyncExitStack() as stack:
        base_url = ""
        if request.param != "extractive":
            fake = await stack.enter_async_context(FakeOpenAI(model="chat-model"))
            base_url = fake.base_url
        yield await stack.enter_async_context(running(settings_for(request.param, base_url)))


async def stream(
    client: ChatClient, req: chat_pb2.ChatRequest
) -> list[chat_pb2.ChatStreamResponse]:
    return [chunk async for chunk in client.chat_stream(req)]


def shape(
    chunks: list[chat_pb2.ChatStreamResponse],
) -> tuple[list[str], chat_pb2.FinishReason.ValueType, common_pb2.Usage]:
    """Check the stream's shape (chat.proto); return its contents, finish reason and usage."""
    assert len(chunks) >= 2
    head, *_ = chunks
    assert {(c.id, c.model, c.created) for c in chunks} == {(head.id, head.model, head.created)}
    assert head.id.startswith("chatcmpl-")
    assert head.created > 0
    assert [c.role for c in chunks] == [ASSISTANT] + [chat_pb2.ROLE_UNSPECIFIED] * (len(chunks) - 1)
    *content, final = chunks
    assert final.HasField("usage")
    assert (final.content, final.finish_reason) == ("", UNSPECIFIED)
    assert not any(c.HasField("usage") for c in content)
    finishes = [c.finish_reason for c in content]
    assert finishes[-1] != UNSPECIFIED
    assert set(finishes[:-1]) <= {UNSPECIFIED}
    return [c.content for c in content], finishes[-1], final.usage


async def rejected(
    client: ChatClient, req: chat_pb2.ChatRequest, streamed: bool
) -> grpc.aio.AioRpcError:
    call = stream(client, req) if streamed else client.chat(req)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- the contract, on every backend ------------------------------------------------------------


async def test_unary_answer(client: ChatClient) -> None:
    response = await client.chat(chat_request())
    assert response.id.startswith("chatcmpl-")
    assert response.created > 0
    assert response.message.role == ASSISTANT
    assert response.message.content
    assert response.finish_reason == chat_pb2.FINISH_REASON_STOP
    usage = response.usage
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    models = await ModelClient(client.channel).list_models()
    assert [m.id for m in models.models] == [response.model]
    assert models.models[0].kind == common_pb2.MODEL_KIND_CHAT


async def test_stream_has_the_promised_shape_and_matches_the_unary_answer(
    client: ChatClient,
) -> None:
    unary = await client.chat(chat_request())
    contents, finish, usage = shape(await stream(client, chat_request()))
    assert "".join(contents) == unary.message.content
    assert finish == unary.finish_reason
    assert usage == unary.usage


async def test_explicit_zero_sampling_is_accepted(client: ChatClient) -> None:
    req = chat_request(temperature=0, top_p=0, presence_penalty=0, frequency_penalty=0, seed=0)
    assert (await client.chat(req)).message.content


async def test_the_served_model_may_be_named(client: ChatClient) -> None:
    model = (await client.chat(chat_request())).model
    assert (await client.chat(chat_request(model=model))).model == model


BAD: list[tuple[str, chat_pb2.ChatRequest, grpc.StatusCode, str]] = [
    ("no messages", chat_request(messages=[]), grpc.StatusCode.INVALID_ARGUMENT,
     "messages is empty"),
    ("no user", chat_request(messages=[message("be brief", SYSTEM)]),
     grpc.StatusCode.INVALID_ARGUMENT, "no ROLE_USER message"),
    ("role unset", chat_request(messages=[message("hi", chat_pb2.ROLE_UNSPECIFIED)]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role is ROLE_UNSPECIFIED"),
    ("unknown role", chat_request(messages=[message("hi"), message("?", ROLE_42)]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages[1].role is 42"),
    ("temperature", chat_request(temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature must be within 0..2, got 2.5"),
    ("temperature<0", chat_request(temperature=-0.1), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature must be within 0..2"),
    ("top_p", chat_request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT,
     "top_p must be within 0..1"),
    ("max_tokens", chat_request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens must be >= 1"),
    ("presence", chat_request(presence_penalty=-3), grpc.StatusCode.INVALID_ARGUMENT,
     "presence_penalty must be within -2..2"),
    ("frequency", chat_request(frequency_penalty=2.5), grpc.StatusCode.INVALID_ARGUMENT,
     "frequency_penalty must be within -2..2"),
    ("stops", chat_request(stop=list("abcde")), grpc.StatusCode.INVALID_ARGUMENT,
     "at most 4 allowed"),
    ("empty stop", chat_request(stop=["x", ""]), grpc.StatusCode.INVALID_ARGUMENT,
     "stop[1] is empty"),
    ("empty passage", chat_request(passages=["fine", "  "]), grpc.StatusCode.INVALID_ARGUMENT,
     "documents[1].text is empty"),
    ("model", chat_request(model="gpt-9"), grpc.StatusCode.NOT_FOUND,
     "'gpt-9' is not served here"),
]  # fmt: skip


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("req", "code", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_input_is_refused_saying_what_to_fix(
    client: ChatClient,
    req: chat_pb2.ChatRequest,
    code: grpc.StatusCode,
    words: str,
    streamed: bool,
) -> None:
    error = await rejected(client, req, streamed)
    assert error.code() is code
    assert words in (error.details() or "")


@pytest.mark.parametrize("kind", BACKENDS)
async def test_limits_name_their_variable(kind: str, fake: FakeOpenAI) -> None:
    settings = settings_for(
        kind, fake.base_url, max_messages=2, max_message_chars=50, max_documents=2,
        max_document_chars=100,
    )  # fmt: skip
    cases = [
        (chat_request(messages=[message("a")] * 3), "3 given, at most 2", "MAX_MESSAGES"),
        (chat_request(messages=[message("a" * 51)]), "51 characters, at most 50",
         "MAX_MESSAGE_CHARS"),
        (chat_request(passages=["a", "b", "c"]), "3 given, at most 2", "MAX_DOCUMENTS"),
        (chat_request(passages=["a" * 101]), "101 characters, at most 100",
         "MAX_DOCUMENT_CHARS"),
    ]  # fmt: skip
    async with running(settings) as client:
        await client.chat(chat_request(passages=PASSAGES[:2]))  # within every limit
        for req, numbers, variable in cases:
            error = await rejected(client, req, streamed=False)
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert numbers in (error.details() or "")
            assert f"OPEA_CHAT_{variable}" in (error.details() or "")


# -- extractive: grounded, verbatim, cited -----------------------------------------------------

CITED = re.compile(r"(.+?) \[(\d+)\](?: |$)")


def citations(answer: str) -> list[tuple[str, int]]:
    """``[(sentence, n), ...]`` of an answer made of ``sentence [n]`` pieces, all of it."""
    found = [(m.group(1), int(m.group(2))) for m in CITED.finditer(answer)]
    assert " ".join(f"{s} [{n}]" for s, n in found) == answer, answer
    return found


@pytest.fixture
async def extractive() -> AsyncIterator[ChatClient]:
    async with running(Settings()) as client:
        yield client


async def test_extractive_quotes_sentences_verbatim_with_their_passage(
    extractive: ChatClient,
) -> None:
    response = await extractive.chat(chat_request())
    found = citations(response.message.content)
    assert ("The Eiffel Tower was completed in 1889.", 1) in found
    for sentence, n in found:
        assert sentence in PASSAGES[n - 1]
    assert response.model == "extractive-answerer"


async def test_extractive_cites_the_passage_by_its_position(extractive: ChatClient) -> None:
    passages = [PASSAGES[2], PASSAGES[1], PASSAGES[0]]
    found = citations((await extractive.chat(chat_request(passages=passages))).message.content)
    assert ("The Eiffel Tower was completed in 1889.", 3) in found
    for sentence, n in found:
        assert sentence in passages[n - 1]


async def test_extractive_orders_quotes_by_passage_then_position() -> None:
    passages = [
        "Rivers flow to the sea. Rivers carry water and rivers carry sand to the sea.",
        "The sea is salty because rivers bring salt to the sea.",
    ]
    async with running(Settings(max_sentences=3)) as client:
        response = await client.chat(chat_request("why do rivers flow to the sea", passages))
    found = citations(response.message.content)
    assert [n for _, n in found] == sorted(n for _, n in found)
    first = [s for s, n in found if n == 1]
    assert first == sorted(first, key=passages[0].index)


async def test_extractive_says_when_it_has_nothing_to_quote(extractive: ChatClient) -> None:
    none = await extractive.chat(chat_request(passages=[]))
    assert none.message.content == NO_CONTEXT
    unrelated = await extractive.chat(chat_request("What do zebras eat?"))
    assert unrelated.message.content == NO_ANSWER
    for response in (none, unrelated):
        assert response.finish_reason == chat_pb2.FINISH_REASON_STOP


async def test_extractive_answers_the_last_user_message(extractive: ChatClient) -> None:
    messages = [
        message("You answer briefly.", SYSTEM),
        message("When was the Eiffel Tower completed?"),
        message("In 1889.", ASSISTANT),
        message("How high is the summit of Mount Everest?"),
    ]
    found = citations((await extractive.chat(chat_request(messages=messages))).message.content)
    assert ("Its summit is 8849 metres high.", 3) in found
    assert all(n == 3 for _, n in found)


async def test_extractive_streams_word_by_word(extractive: ChatClient) -> None:
    unary = await extractive.chat(chat_request())
    contents, _, _ = shape(await stream(extractive, chat_request()))
    assert contents == re.findall(r"\S+\s*", unary.message.content)
    assert all(re.fullmatch(r"\S+\s?", c) for c in contents)


def test_the_tokenizer_counts_words_and_punctuation() -> None:
    assert count_tokens("Hello, world! [1]") == 7  # Hello , world ! [ 1 ]
    assert count_tokens("") == 0


async def test_extractive_usage_is_the_tokenizers_count(extractive: ChatClient) -> None:
    messages = [message("Answer briefly.", SYSTEM), message(QUESTION)]
    req = chat_request(messages=messages)
    response = await extractive.chat(req)
    expected_prompt = sum(count_tokens(m.content) for m in messages)
    expected_prompt += sum(count_tokens(p) for p in PASSAGES)
    assert response.usage.prompt_tokens == expected_prompt
    assert response.usage.completion_tokens == count_tokens(response.message.content)
    _, _, usage = shape(await stream(extractive, req))
    assert usage == response.usage


@pytest.mark.parametrize("max_tokens", [1, 5, 9])
async def test_extractive_max_tokens_cuts_with_finish_length(
    extractive: ChatClient, max_tokens: int
) -> None:
    full = (await extractive.chat(chat_request())).message.content
    assert count_tokens(full) > max_tokens
    cut = await extractive.chat(chat_request(max_tokens=max_tokens))
    assert cut.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert full.startswith(cut.message.content)
    assert cut.usage.completion_tokens == count_tokens(cut.message.content) == max_tokens
    contents, finish, usage = shape(await stream(extractive, chat_request(max_tokens=max_tokens)))
    assert ("".join(contents), finish, usage) == (cut.message.content, cut.finish_reason, cut.usage)


async def test_extractive_max_tokens_beyond_the_answer_changes_nothing(
    extractive: ChatClient,
) -> None:
    full = await extractive.chat(chat_request())
    roomy = await extractive.chat(chat_request(max_tokens=full.usage.completion_tokens))
    assert (roomy.message.content, roomy.finish_reason) == (
        full.message.content,
        chat_pb2.FINISH_REASON_STOP,
    )


async def test_extractive_stops_at_a_stop_sequence(extractive: ChatClient) -> None:
    full = (await extractive.chat(chat_request())).message.content
    assert "1889" in full
    cut = await extractive.chat(chat_request(stop=["zebra", "1889"]))
    assert cut.message.content == full[: full.index("1889")]
    assert cut.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert cut.usage.completion_tokens == count_tokens(cut.message.content)
    contents, finish, _ = shape(await stream(extractive, chat_request(stop=["1889"])))
    assert ("".join(contents), finish) == (cut.message.content, chat_pb2.FINISH_REASON_STOP)


async def test_extractive_max_sentences_bounds_the_answer() -> None:
    async with running(Settings(max_sentences=1)) as client:
        response = await client.chat(chat_request())
    assert citations(response.message.content) == [("The Eiffel Tower was completed in 1889.", 1)]


async def test_extractive_answers_large_requests_off_the_loop_alike() -> None:
    req = chat_request()
    async with running(Settings()) as inline, running(Settings(offload_chars=0)) as threaded:
        a, b = await inline.chat(req), await threaded.chat(req)
    assert (a.message, a.usage) == (b.message, b.usage)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"backend": "gpt"}, "choose one of extractive, openai"),
        ({"backend": "openai", "model": "m"}, "OPEA_CHAT_BASE_URL"),
        ({"backend": "openai", "base_url": "http://x"}, "OPEA_CHAT_MODEL is required"),
        ({"context_template": "no slot"}, "OPEA_CHAT_CONTEXT_TEMPLATE must contain"),
        ({"max_sentences": 0}, "OPEA_CHAT_MAX_SENTENCES"),
        ({"model": "llama"}, "backend extractive serves extractive-answerer"),
    ],
)
def test_bad_settings_name_the_variable(settings: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        make_backend(Settings(**settings))  # type: ignore[arg-type]


# -- the process -------------------------------------------------------------------------------


async def test_python_m_services_chat_serves_and_stops_on_sigterm(
    subprocess_env: dict[str, str],
) -> None:
    argv = ["-m", "services.chat", "--port", "0", "--host", "127.0.0.1"]
    async with served(subprocess_env, *argv) as child:
        assert "chat listening on 127.0.0.1:" in child.line
        probe = await health(subprocess_env, child.target, SERVICE)
        assert probe.code == 0, probe
        channel = connect(child.target, [SERVICE])
        try:
            response = await ChatClient(channel).chat(chat_request())
        finally:
            await channel.close(None)
        assert response.model == "extractive-answerer"
        assert "The Eiffel Tower was completed in 1889. [1]" in response.message.content
        assert await child.stop() == 0


def test_extractive_does_not_quote_markdown_headings() -> None:
    from services.chat.extractive import select

    passage = "## Ports of the gateway\nThe gateway listens on port 8888 for REST."
    answer = select("which port does the gateway listen on", [passage], max_sentences=3)
    assert answer == "The gateway listens on port 8888 for REST. [1]"
