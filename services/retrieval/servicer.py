"""The gRPC face of retrieval: validates requests, translates protobuf <-> backend values.

Every refusal is a :class:`~opea_grpc.errors.ServiceError` whose message names the field and
says what to send instead; the business (ranking, storage) is the backend's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np

from opea_grpc.batch import answer_each
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from opea_grpc.server import Context
from opea_grpc.structs import dict_to_struct, struct_to_dict, value_to_json
from services.retrieval.backend import (
    Backend,
    Condition,
    Hit,
    Op,
    Record,
    Vector,
    check_conditions,
    unknown_collection,
)

if TYPE_CHECKING:
    from services.retrieval.service import Settings

#: Longest collection name accepted.
MAX_NAME = 256
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _invalid(message: str) -> ServiceError:
    return ServiceError(_INVALID, message)


# -- requests ---------------------------------------------------------------------------------


def conditions_of(filter_: common_pb2.Filter, field: str = "filter") -> list[Condition]:
    """The filter's conditions, checked (operator set, value of the right kind)."""
    conditions: list[Condition] = []
    for i, c in enumerate(filter_.conditions):
        where = f"{field}.conditions[{i}] (key {c.key!r})"
        if c.operator == common_pb2.OPERATOR_UNSPECIFIED:
            raise _invalid(
                f"{where}: operator is OPERATOR_UNSPECIFIED; set one of "
                + ", ".join(f"OPERATOR_{op.name}" for op in Op)
            )
        try:
            op = Op(c.operator)
        except ValueError:
            raise _invalid(f"{where}: unknown operator {c.operator}") from None
        if not c.HasField("value") or c.value.WhichOneof("kind") in (None, "null_value"):
            raise _invalid(f"{where}: value is not set; give the value to compare with")
        value = value_to_json(c.value)
        if isinstance(value, list):
            conditions.append(Condition(c.key, op, tuple(value)))  # type: ignore[arg-type]
        else:
            conditions.append(Condition(c.key, op, value))  # type: ignore[arg-type]
    check_conditions(conditions, field=field)
    return conditions


def vector_of(values: Sequence[float], where: str) -> Vector:
    """A finite, non-zero float32 vector; ``where`` names the field in errors."""
    vector = np.asarray(values, dtype=np.float32)
    if not np.isfinite(vector).all():  # the methods: half the cost of np.all() / np.any()
        raise _invalid(f"{where} contains NaN or infinity: send finite numbers")
    if not vector.any():
        raise _invalid(f"{where} is all zeros: a zero vector has no direction to compare")
    return vector


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """``opea.v1.RetrievalService`` over a :class:`~services.retrieval.backend.Backend`."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self._backend = backend
        self._settings = settings

    def _collection(self, name: str, field: str = "collection") -> str:
        if len(name) > MAX_NAME:
            raise _invalid(f"{field} is {len(name)} characters long; the limit is {MAX_NAME}")
        return name or self._settings.default_collection

    async def Search(
        self, request: retrieval_pb2.SearchRequest, context: Context
    ) -> retrieval_pb2.SearchResponse:
        return await self._search(request)

    async def SearchBatch(
        self, request: retrieval_pb2.SearchBatchRequest, context: Context
    ) -> retrieval_pb2.SearchBatchResponse:
        results = await answer_each(request.requests, self._search, retrieval_pb2.SearchBatchResult)
        return retrieval_pb2.SearchBatchResponse(results=results)

    async def _search(self, request: retrieval_pb2.SearchRequest) -> retrieval_pb2.SearchResponse:
        s = self._settings
        collection = self._collection(request.collection)
        top_k = request.top_k or s.default_top_k
        if not 1 <= top_k <= s.max_top_k:
            raise _invalid(
                f"top_k is {request.top_k}; give 1..{s.max_top_k} "
                f"(OPEA_RETRIEVAL_MAX_TOP_K), or 0 for the default {s.default_top_k}"
            )
        query = request.query if request.query.strip() else ""
        vector = vector_of(request.vector, "vector") if len(request.vector) else None
        if vector is None and not query:
            raise _invalid(
                "give vector (the query's embedding), query (text for a lexical search), or both"
            )
        threshold: float | None = None
        if request.HasField("score_threshold"):
            threshold = request.score_threshold
            if math.isnan(threshold):
                raise _invalid("score_threshold is NaN: give a number, or leave it unset")
        hits = await self._backend.search(
            collection, vector, query, top_k, conditions_of(request.filter), threshold
        )
        return retrieval_pb2.SearchResponse(documents=[_scored(h) for h in hits])

    async def Upsert(
        self, request: retrieval_pb2.UpsertRequest, context: Context
    ) -> retrieval_pb2.UpsertResponse:
        collection = self._collection(request.collection)
        documents = request.documents
        if not documents:
            raise _invalid("documents is empty: send at least one document with its embedding")
        limit = self._settings.max_batch
        if len(documents) > limit:
            raise _invalid(
                f"{len(documents)} documents in one request; the limit is {limit} "
                "(OPEA_RETRIEVAL_MAX_BATCH): split them into several requests"
            )
        records: list[Record] = []
        seen: dict[str, int] = {}
        dimensions = len(documents[0].embedding)
        for i, doc in enumerate(documents):
            if not doc.id:
                raise _invalid(f"documents[{i}].id is empty: every document needs a stable id")
            if doc.id in seen:
                raise _invalid(
                    f"documents[{i}].id {doc.id!r} repeats documents[{seen[doc.id]}].id: "
                    "send each id once per request"
                )
            seen[doc.id] = i
            if not doc.embedding:
                raise _invalid(
                    f"documents[{i}].embedding is empty: each document must carry its embedding"
                )
            if len(doc.embedding) != dimensions:
                raise _invalid(
                    f"documents[{i}].embedding has {len(doc.embedding)} dimensions but "
                    f"documents[0].embedding has {dimensions}: one request, one dimension"
                )
            vector = vector_of(doc.embedding, f"documents[{i}].embedding")
            records.append(Record(doc.id, doc.text, struct_to_dict(doc.metadata), vector))
        count = await self._backend.upsert(collection, records)
        return retrieval_pb2.UpsertResponse(upserted_count=count)

    async def Delete(
        self, request: retrieval_pb2.DeleteRequest, context: Context
    ) -> retrieval_pb2.DeleteResponse:
        collection = self._collection(request.collection)
        for i, id_ in enumerate(request.ids):
            if not id_:
                raise _invalid(f"ids[{i}] is empty: give the ids of the documents to delete")
        conditions = conditions_of(request.filter)
        if not request.ids and not conditions:
            raise _invalid(
                "give ids and/or a filter with conditions to delete by; "
                "to delete every document use DeleteCollection"
            )
        count = await self._backend.delete(collection, list(request.ids), conditions)
        return retrieval_pb2.DeleteResponse(deleted_count=count)

    async def ListCollections(
        self, request: retrieval_pb2.ListCollectionsRequest, context: Context
    ) -> retrieval_pb2.ListCollectionsResponse:
        return retrieval_pb2.ListCollectionsResponse(
            collections=[
                retrieval_pb2.Collection(
                    name=c.name, dimensions=c.dimensions, document_count=c.count
                )
                for c in await self._backend.collections()
            ]
        )

    async def DeleteCollection(
        self, request: retrieval_pb2.DeleteCollectionRequest, context: Context
    ) -> retrieval_pb2.DeleteCollectionResponse:
        if not request.name:
            raise _invalid(
                "name is empty: name the collection to delete "
                f"(the default one is {self._settings.default_collection!r})"
            )
        name = self._collection(request.name, "name")
        if not await self._backend.drop(name):
            existing = [c.name for c in await self._backend.collections()]
            raise unknown_collection(name, existing)
        return retrieval_pb2.DeleteCollectionResponse()


def _scored(hit: Hit) -> common_pb2.ScoredDocument:
    scored = common_pb2.ScoredDocument(score=hit.score)
    doc = scored.document  # filled in place: no copy of the document
    doc.id, doc.text = hit.id, hit.text
    dict_to_struct(hit.metadata, doc.metadata)
    return scored
