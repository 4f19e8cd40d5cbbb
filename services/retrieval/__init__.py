"""The retrieval service (``opea.v1.RetrievalService``): a vector index of documents.

Documents (id, text, metadata, embedding) live in named collections; Search ranks them by cosine
similarity to a query vector, fused with BM25 over their text when the request carries query text,
after applying metadata filters. Backends:

- ``local`` (default): a durable on-disk index inside the process (SQLite + numpy, exact search,
  HNSW via usearch past a size, FTS5 BM25), see :mod:`services.retrieval.local`;
- ``pgvector``: PostgreSQL with the pgvector extension over the network (extra ``pgvector``).
"""
