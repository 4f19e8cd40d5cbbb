"""The megaservice gateway: the ChatQnA pipeline (embedding -> retrieval -> rerank -> chat) over
gRPC, with an OpenAI-compatible REST facade and a gRPC face (``opea.v1.ChatQnAService``).

``opea-grpc serve gateway`` runs it; :mod:`gateway.service` builds it.
"""
