"""The REST request and response models: pydantic lives here, at the HTTP edge, and nowhere else.

Field names and defaults follow OpenAI's API (and vLLM's server where OpenAI has no route, as
for rerank). The pipeline's own knobs live in one extension field, ``opea``, never beside
OpenAI's fields; unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool", "developer"]
Operator = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in"]
Scalar = str | float | bool


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class Condition(_Request):
    """One metadata condition; all conditions of a filter must hold."""

    key: str = Field(min_length=1)
    op: Operator = "eq"
    value: Scalar | list[Scalar]


class RagOptions(_Request):
    """The ``opea`` extension: how the pipeline looks for context."""

    collection: str | None = Field(None, description="collection to search (default: config)")
    top_k: int | None = Field(None, ge=1, le=1000, description="candidates retrieved")
    top_n: int | None = Field(None, ge=1, le=1000, description="passages given to the model")
    retrieval: bool = Field(True, description="false: answer without retrieval")
    rerank: bool = Field(True, description="false: skip the rerank step")
    filter: list[Condition] | None = Field(None, description="metadata conditions (AND)")
    timeout: float | None = Field(None, gt=0, description="seconds for the whole request")
    cache: bool = Field(True, description="false: bypass the pipeline's caches")


class ChatCompletionRequest(_Request):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    opea: RagOptions | None = None


class ChatQnARequest(_Request):
    """OPEA's ChatQnA request shape (``messages`` may be one string; ``stream`` defaults on)."""

    messages: str | list[Message]
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    k: int | None = Field(None, ge=1, le=1000, description="candidates retrieved")
    top_n: int | None = Field(None, ge=1, le=1000, description="passages kept after rerank")
    stream: bool = True
    stream_options: StreamOptions | None = None
    user: str | None = None


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class RerankDocument(_Request):
    text: str


class RerankRequest(_Request):
    query: str
    documents: list[str | RerankDocument] = Field(min_length=1)
    model: str | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True


class IngestDocument(_Request):
    text: str = Field(min_length=1)
    id: str | None = Field(None, min_length=1, description="stable id (e.g. a file path)")
    metadata: dict[str, Any] | None = None


class IngestRequest(_Request):
    documents: list[IngestDocument] = Field(min_length=1, max_length=10000)
    collection: str | None = None
    chunk_size: int | None = Field(None, ge=1)
    chunk_overlap: int | None = Field(None, ge=0)


class SearchRequest(_Request):
    query: str = Field(min_length=1)
    collection: str | None = None
    top_k: int = Field(10, ge=1, le=1000)
    filter: list[Condition] | None = None
    hybrid: bool = Field(True, description="fuse BM25 over the query text with dense search")


class DeleteRequest(_Request):
    collection: str | None = None
    ids: list[str] | None = Field(None, description="chunk ids to delete")
    sources: list[str] | None = Field(None, description="delete every chunk of these documents")
    filter: list[Condition] | None = None


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
