"""opea-grpc: compose GenAI microservices over typed gRPC contracts.

Importing this package reads no environment, starts nothing and configures no logging.
"""

from opea_grpc.channel import Channels, connect
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.errors import GraphError, NodeError, ServiceError
from opea_grpc.node import Node
from opea_grpc.orchestrator import ServiceOrchestrator
from opea_grpc.server import Context, MicroService, ServiceRole, ServiceType

__all__ = [
    "Channels",
    "ClientConfig",
    "Context",
    "GraphError",
    "MicroService",
    "Node",
    "NodeError",
    "ServerConfig",
    "ServiceError",
    "ServiceOrchestrator",
    "ServiceRole",
    "ServiceType",
    "connect",
]
