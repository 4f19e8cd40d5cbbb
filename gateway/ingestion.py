"""Writes to the knowledge base: ingest (chunk, embed, upsert), search, delete.

A document's chunks get the ids ``f"{id}#{n}"`` and the metadata ``source`` (the document's id)
and ``chunk`` (n), so ingesting a document again replaces it: its chunks are upserted, then the
chunks beyond its new length are deleted. Every write drops the pipeline's cached searches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from gateway import schemas, translate
from gateway.chunking import chunk
from gateway.megaservice import ChatQnA
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import common_pb2, embedding_pb2, retrieval_pb2

#: Chunks embedded per Embed call and stored per Upsert call.
BATCH = 32


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str
    metadata: struct_pb2.Struct


def _metadata(base: dict[str, Any] | None, source: str, n: int) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    try:
        json_format.ParseDict({**(base or {}), "source": source, "chunk": n}, out)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT, f"metadata of {source!r} is not plain JSON: {exc}"
        ) from None
    return out


def chunks_of(
    documents: Sequence[schemas.IngestDocument], size: int, overlap: int
) -> tuple[list[Chunk], dict[str, int]]:
    """Every document's chunks, and how many chunks each source has."""
    latest: dict[str, schemas.IngestDocument] = {}
    for doc in documents:  # one id twice: the later document wins, as with any upsert
        source = doc.id or "sha256:" + hashlib.sha256(doc.text.encode()).hexdigest()[:16]
        latest.pop(source, None)
        latest[source] = doc
    out: list[Chunk] = []
    counts: dict[str, int] = {}
    for source, doc in latest.items():
        pieces = chunk(doc.text, size, overlap)
        counts[source] = len(pieces)
        out.extend(
            Chunk(f"{source}#{n}", text, _metadata(doc.metadata, source, n))
            for n, text in enumerate(pieces)
        )
    return out, counts


class Knowledge:
    """The knowledge-base routes' work, over the pipeline's clients."""

    def __init__(self, pipeline: ChatQnA) -> None:
        self._pipeline = pipeline
        self._clients = pipeline.downstreams
        self._settings = pipeline.settings

    def collection(self, name: str | None) -> str:
        return name or self._settings.collection

    async def ingest(self, req: schemas.IngestRequest, *, timeout: float) -> dict[str, Any]:
        s = self._settings
        size = req.chunk_size if req.chunk_size is not None else s.chunk_size
        # The default overlap shrinks with a small chunk size; no overlap reaches the size.
        overlap = (
            req.chunk_overlap if req.chunk_overlap is not None else min(s.chunk_overlap, size // 5)
        )
        overlap = min(overlap, size - 1)
        collection = self.collection(req.collection)
        chunks, counts = chunks_of(req.documents, size, overlap)
        try:
            for start in range(0, len(chunks), BATCH):
                batch = chunks[start : start + BATCH]
                embedded = await self._clients.embedding.embed(
                    embedding_pb2.EmbedRequest(input=[c.text for c in batch]), timeout=timeout
                )
                documents = [
                    common_pb2.Document(
                        id=c.id, text=c.text, metadata=c.metadata, embedding=e.embedding
                    )
                    for c, e in zip(batch, embedded.data, strict=True)
                ]
                await self._clients.retrieval.upsert(
                    retrieval_pb2.UpsertRequest(collection=collection, documents=documents),
                    timeout=timeout,
                )
            for source, count in counts.items():
                await self._delete(collection, _stale(source, count), timeout)
        finally:
            await self._pipeline.collection_changed(collection)
        return {
            "object": "ingest",
            "collection": collection,
            "documents": len(counts),
            "chunks": len(chunks),
            "ids": [c.id for c in chunks],
        }

    async def _delete(self, collection: str, where: common_pb2.Filter, timeout: float) -> int:
        reply = await self._clients.retrieval.delete(
            retrieval_pb2.DeleteRequest(collection=collection, filter=where), timeout=timeout
        )
        return reply.deleted_count

    async def search(self, req: schemas.SearchRequest, *, timeout: float) -> dict[str, Any]:
        embedded = await self._clients.embedding.embed(
            embedding_pb2.EmbedRequest(input=[req.query]), timeout=timeout
        )
        found = await self._clients.retrieval.search(
            retrieval_pb2.SearchRequest(
                collection=self.collection(req.collection),
                vector=embedded.data[0].embedding,
                query=req.query if req.hybrid else "",
                top_k=req.top_k,
                filter=translate.filter_of(req.filter),
            ),
            timeout=timeout,
        )
        return {"object": "list", "data": translate.sources(found.documents)}

    async def delete(self, req: schemas.DeleteRequest, *, timeout: float) -> dict[str, Any]:
        collection = self.collection(req.collection)
        if not (req.ids or req.sources or req.filter):  # the schema says so; pydantic cannot
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "say what to delete: ids, sources or filter (to drop a whole collection, "
                "DELETE /v1/collections/{name})",
            )
        deleted = 0
        try:
            if req.ids or req.filter:
                reply = await self._clients.retrieval.delete(
                    retrieval_pb2.DeleteRequest(
                        collection=collection,
                        ids=req.ids,
                        filter=translate.filter_of(req.filter or None),
                    ),
                    timeout=timeout,
                )
                deleted += reply.deleted_count
            if req.sources:
                deleted += await self._delete(collection, _sources(req.sources), timeout)
        finally:
            await self._pipeline.collection_changed(collection)
        return {"deleted": deleted}

    async def collections(self, *, timeout: float) -> dict[str, Any]:
        reply = await self._clients.retrieval.list_collections(timeout=timeout)
        return {
            "object": "list",
            "data": [
                {"name": c.name, "dimensions": c.dimensions, "document_count": c.document_count}
                for c in reply.collections
            ],
        }

    async def drop(self, name: str, *, timeout: float) -> None:
        try:
            await self._clients.retrieval.delete_collection(name, timeout=timeout)
        finally:
            await self._pipeline.collection_changed(name)


def _stale(source: str, count: int) -> common_pb2.Filter:
    return common_pb2.Filter(
        conditions=[
            common_pb2.Condition(
                key="source", operator=common_pb2.OPERATOR_EQ, value=translate.value(source)
            ),
            common_pb2.Condition(
                key="chunk", operator=common_pb2.OPERATOR_GTE, value=translate.value(count)
            ),
        ]
    )


def _sources(sources: list[str]) -> common_pb2.Filter:
    return common_pb2.Filter(
        conditions=[
            common_pb2.Condition(
                key="source", operator=common_pb2.OPERATOR_IN, value=translate.value(list(sources))
            )
        ]
    )
