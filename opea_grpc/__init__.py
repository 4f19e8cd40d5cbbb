"""opea-grpc: compose GenAI microservices over typed gRPC contracts.

Importing this package reads no environment, starts nothing and configures no logging. Nor does
it import ``grpc``: each name below loads its module when first used, so the ``opea-grpc``
command can settle gRPC core's environment first (:mod:`opea_grpc.entry`).
"""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from opea_grpc.channel import Channels, connect
    from opea_grpc.config import ClientConfig, ServerConfig
    from opea_grpc.errors import GraphError, NodeError, ServiceError
    from opea_grpc.node import Node
    from opea_grpc.orchestrator import ServiceOrchestrator
    from opea_grpc.server import Context, MicroService, ServiceRole, ServiceType

#: Each public name and the module that defines it.
_HOMES = {
    "Channels": "opea_grpc.channel",
    "connect": "opea_grpc.channel",
    "ClientConfig": "opea_grpc.config",
    "ServerConfig": "opea_grpc.config",
    "GraphError": "opea_grpc.errors",
    "NodeError": "opea_grpc.errors",
    "ServiceError": "opea_grpc.errors",
    "Node": "opea_grpc.node",
    "ServiceOrchestrator": "opea_grpc.orchestrator",
    "Context": "opea_grpc.server",
    "MicroService": "opea_grpc.server",
    "ServiceRole": "opea_grpc.server",
    "ServiceType": "opea_grpc.server",
}

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


def __getattr__(name: str) -> typing.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'opea_grpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
