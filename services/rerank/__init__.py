"""The rerank service (``opea.v1.RerankService``): reorders candidate passages by relevance.

Backends (``OPEA_RERANK_BACKEND``):

``lexical`` (default, offline)
    BM25 over the candidates of each request, fused with their incoming order by reciprocal
    rank fusion, so the first-stage retriever's ranking still counts. Model id ``bm25-rrf``.
``openai``
    An upstream rerank server: the Cohere/Jina/vLLM shape (``POST /v1/rerank``) or TEI's
    (``POST /rerank``), chosen by ``OPEA_RERANK_API``.
"""
