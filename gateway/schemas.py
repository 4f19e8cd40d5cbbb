"""The REST request and response models: pydantic lives here, at the HTTP edge, and nowhere else.

Field names and defaults follow OpenAI's API (and vLLM's server where OpenAI has no route, as
for rerank). The pipeline's own knobs live in one extension field, ``opea``, never beside
OpenAI's fields; unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.config import JsonDict


def _integral(value: object) -> object:
    """JSON Schema counts 3.0 as an integer; so do we (but not 3.5, nor "3")."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_INTEGRAL = BeforeValidator(_integral)
#: Largest value of the contracts' int32 fields.
INT32 = 2**31 - 1
Role = Literal["system", "user", "assistant", "tool", "developer"]
Text = Annotated[str, Field(min_length=1)]
Number = Annotated[float, Field(allow_inf_nan=False)]
Scalar = str | Number | bool
#: A metadata key; dots walk nested objects (``a.b``), no part may be empty.
Key = Annotated[str, Field(pattern=r"^[^.]+(\.[^.]+)*$", max_length=256)]
Collection = Annotated[str, Field(max_length=256)]
#: Longest conversation the chat service takes (its OPEA_CHAT_MAX_MESSAGES default).
MAX_MESSAGES = 256


class _Request(BaseModel):
    # strict: JSON types must match (no "true" for true, no 1.5 for an integer)
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


_ASKS: JsonDict = {
    "contains": {
        "type": "object",
        "properties": {"role": {"const": "user"}, "content": {"type": "string", "pattern": "\\S"}},
        "required": ["role", "content"],
    }
}


def _has_question(messages: list[Message]) -> None:
    if not any(m.role == "user" and m.text().strip() for m in messages):
        raise ValueError("messages needs a user message with text: the question to answer")


Stop = Text | Annotated[list[Text], Field(max_length=4)]


class StreamOptions(_Request):
    include_usage: bool = False


class Match(_Request):
    """``metadata[key] == value`` (``eq``, the default) or ``!=`` (``ne``)."""

    key: Key
    op: Literal["eq", "ne"] = "eq"
    value: Scalar


class Compare(_Request):
    """``metadata[key]`` ordered against a number or a string."""

    key: Key
    op: Literal["gt", "gte", "lt", "lte"]
    value: str | Number


class Member(_Request):
    """``metadata[key]`` in (or not in) a list of values."""

    key: Key
    op: Literal["in", "not_in"]
    value: list[Scalar]


#: One metadata condition; all conditions of a filter must hold.
Condition = Match | Compare | Member


class RagOptions(_Request):
    """The ``opea`` extension: how the pipeline looks for context."""

    collection: Collection | None = Field(None, description="collection (default: config)")
    top_k: Annotated[int, Field(ge=1, le=1000), _INTEGRAL] | None = Field(
        None, description="candidates retrieved"
    )
    top_n: Annotated[int, Field(ge=1, le=1000), _INTEGRAL] | None = Field(
        None, description="passages given to the model"
    )
    retrieval: bool = Field(True, description="false: answer without retrieval")
    rerank: bool = Field(True, description="false: skip the rerank step")
    filter: list[Condition] | None = Field(None, description="metadata conditions (AND)")
    timeout: float | None = Field(None, gt=0, description="seconds for the whole request")
    cache: bool = Field(True, description="false: bypass the pipeline's caches")


class ChatCompletionRequest(_Request):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES, json_schema_extra=_ASKS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: Annotated[int, Field(ge=1, le=INT32), _INTEGRAL] | None = Field(None)
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32), _INTEGRAL] | None = Field(None)
    seed: Annotated[int, Field(ge=-(2**53), le=2**53), _INTEGRAL] | None = Field(None)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: Stop | None = None
    n: Annotated[int, Field(ge=1, le=1), _INTEGRAL] = Field(1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    opea: RagOptions | None = None

    @model_validator(mode="after")
    def _asks(self) -> ChatCompletionRequest:
        _has_question(self.messages)
        return self


class ChatQnARequest(_Request):
    """OPEA's ChatQnA request shape (``messages`` may be one string; ``stream`` defaults on)."""

    messages: (
        Annotated[str, Field(pattern="\\S")]
        | Annotated[
            list[Message], Field(min_length=1, max_length=MAX_MESSAGES, json_schema_extra=_ASKS)
        ]
    )
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT32), _INTEGRAL] | None = Field(None)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: Stop | None = None
    seed: Annotated[int, Field(ge=-(2**53), le=2**53), _INTEGRAL] | None = Field(None)
    k: Annotated[int, Field(ge=1, le=1000), _INTEGRAL] | None = Field(
        None, description="candidates retrieved"
    )
    top_n: Annotated[int, Field(ge=1, le=1000), _INTEGRAL] | None = Field(
        None, description="passages kept after rerank"
    )
    stream: bool = True
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _asks(self) -> ChatQnARequest:
        if not isinstance(self.messages, str):
            _has_question(self.messages)
        return self


class EmbeddingRequest(_Request):
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=2048)]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=INT32), _INTEGRAL] | None = Field(None)
    user: str | None = None


class RerankDocument(_Request):
    text: Text


class RerankRequest(_Request):
    query: Text
    documents: list[Text | RerankDocument] = Field(min_length=1, max_length=1000)
    model: str | None = None
    top_n: Annotated[int, Field(ge=1, le=INT32), _INTEGRAL] | None = Field(None)
    return_documents: bool = True


class IngestDocument(_Request):
    text: str = Field(min_length=1)
    id: str | None = Field(None, min_length=1, description="stable id (e.g. a file path)")
    metadata: dict[str, Any] | None = None


class IngestRequest(_Request):
    documents: list[IngestDocument] = Field(min_length=1, max_length=10000)
    collection: Collection | None = None
    chunk_size: Annotated[int, Field(ge=1, le=INT32), _INTEGRAL] | None = Field(
        None, description="characters per chunk"
    )
    chunk_overlap: Annotated[int, Field(ge=0, le=INT32), _INTEGRAL] | None = Field(
        None, description="characters neighbouring chunks share (below chunk_size)"
    )


class SearchRequest(_Request):
    query: Text
    collection: Collection | None = None
    top_k: Annotated[int, Field(ge=1, le=1000), _INTEGRAL] = Field(10)
    filter: list[Condition] | None = None
    hybrid: bool = Field(True, description="fuse BM25 over the query text with dense search")


class DeleteRequest(_Request):
    """Give at least one of ``ids``, ``sources`` and ``filter``; what any of them names goes."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [{"required": ["ids"]}, {"required": ["sources"]}, {"required": ["filter"]}]
        }
    )

    collection: Collection | None = None
    ids: list[Text] = Field(default_factory=list, min_length=1, description="chunk ids")
    sources: list[Text] = Field(
        default_factory=list, min_length=1, description="delete every chunk of these documents"
    )
    filter: list[Condition] = Field(default_factory=list, min_length=1)


# -- responses (for /openapi.json; routes write the JSON themselves) ----------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class Source(BaseModel):
    id: str
    text: str
    score: float
    metadata: dict[str, Any] = {}


class NodeReport(BaseModel):
    name: str
    status: Literal["ok", "failed", "timed_out", "skipped"]
    duration_ms: float
    message: str = ""


class PipelineReport(BaseModel):
    sources: list[Source] = []
    nodes: list[NodeReport] = []
    degraded: bool = False


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    opea: PipelineReport


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class IngestResponse(BaseModel):
    object: Literal["ingest"] = "ingest"
    collection: str
    documents: int
    chunks: int
    ids: list[str]


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Source]


class CollectionInfo(BaseModel):
    name: str
    dimensions: int
    document_count: int


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionInfo]


class DeleteResponse(BaseModel):
    deleted: int


class Status(BaseModel):
    status: str
    detail: dict[str, str] = {}
