"""``opea.v1.ModelService``: which models a server serves.

Every built-in microservice registers one, so the gateway can answer ``/v1/models`` by asking
its downstreams, and an operator can ask any port with grpcurl.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opea_grpc.pb.v1 import common_pb2, common_pb2_grpc
from opea_grpc.server import Context


class ModelCatalog(common_pb2_grpc.ModelServiceServicer):
    """Lists the models that ``models()`` returns at the time of the call."""

    def __init__(self, models: Callable[[], Sequence[common_pb2.Model]]) -> None:
        self._models = models

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: Context
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=list(self._models()))


add_to_server = common_pb2_grpc.add_ModelServiceServicer_to_server
