"""The gateway's gRPC face: ``opea.v1.ChatQnAService`` over the same pipeline as REST, and
``opea.v1.ModelService`` listing what the downstreams serve."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from gateway.limits import Capacity
from gateway.megaservice import ChatQnA, node_reports
from gateway.mesh import Mesh
from opea_grpc.pb.v1 import chatqna_pb2, chatqna_pb2_grpc, common_pb2, common_pb2_grpc
from opea_grpc.server import Context


class ModelsServicer(common_pb2_grpc.ModelServiceServicer):
    """``opea.v1.ModelService`` on the gateway: every model its downstreams serve."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: Context
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=await self._mesh.models())


#: Charges the model tokens a call used to its caller (from the call's metadata).
Charge = Callable[[object, int], None]


class ChatQnAServicer(chatqna_pb2_grpc.ChatQnAServiceServicer):
    """Ask and AskStream; the caller's deadline (else the gateway's default) bounds the run.

    With a ``capacity`` (shared with the REST facade), a call beyond it is refused at once with
    RESOURCE_EXHAUSTED.
    """

    def __init__(
        self, pipeline: ChatQnA, charge: Charge | None = None, capacity: Capacity | None = None
    ) -> None:
        self._pipeline = pipeline
        self._charge = charge
        self._capacity = capacity

    def _charged(self, context: Context, tokens: int) -> None:
        if self._charge is not None:
            self._charge(context.invocation_metadata(), tokens)

    def _timeout(self, context: Context) -> float:
        left = context.time_remaining()
        settings = self._pipeline.settings
        return settings.timeout if left is None else min(left, settings.max_timeout)

    async def Ask(
        self, request: chatqna_pb2.AskRequest, context: Context
    ) -> chatqna_pb2.AskResponse:
        capacity = self._capacity
        if capacity is not None:
            if capacity.full():
                raise capacity.refusal()
            capacity.enter()
        try:
            answer = await self._pipeline.ask(request, timeout=self._timeout(context))
        finally:
            if capacity is not None:
                capacity.leave()
        self._charged(context, answer.response.usage.total_tokens)
        return chatqna_pb2.AskResponse(
            chat=answer.response,
            sources=answer.sources,
            nodes=node_reports(answer.timings),
            degraded=answer.degraded,
        )

    async def AskStream(
        self, request: chatqna_pb2.AskStreamRequest, context: Context
    ) -> AsyncIterator[chatqna_pb2.AskStreamResponse]:
        capacity = self._capacity
        if capacity is not None:
            if capacity.full():
                raise capacity.refusal()
            capacity.enter()
        try:
            async with self._pipeline.ask_stream(
                request.request, timeout=self._timeout(context)
            ) as run:
                first = True
                async for chunk in run:
                    if chunk.HasField("usage"):
                        self._charged(context, chunk.usage.total_tokens)
                    reply = chatqna_pb2.AskStreamResponse(chunk=chunk)
                    if first:
                        reply.sources.extend(run.state.sources)
                        reply.degraded = run.degraded
                        first = False
                    yield reply
                yield chatqna_pb2.AskStreamResponse(
                    nodes=node_reports(run.timings), degraded=run.degraded
                )
        finally:
            if capacity is not None:
                capacity.leave()
