"""The gateway's view of its downstreams: one channel each, typed clients, readiness, models.

Each client has a circuit breaker (:mod:`opea_grpc.breaker`, ``OPEA_CLIENT_BREAKER_*``) unless
``OPEA_CLIENT_BREAKER=false``: a downstream that keeps failing gets no calls for a while.

Readiness comes from the channels themselves: with client-side health checking a channel is
READY only while some replica of its target reports SERVING on its health Watch stream. One
task per channel waits on state changes, so answering ``/readyz`` reads a flag and makes no call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from gateway.megaservice import Downstreams
from gateway.settings import Settings
from opea_grpc.breaker import Breaker
from opea_grpc.channel import Channels
from opea_grpc.client import (
    ChatClient,
    EmbeddingClient,
    ModelClient,
    RerankClient,
    RetrievalClient,
)
from opea_grpc.config import ClientConfig
from opea_grpc.errors import ServiceError
from opea_grpc.pb.v1 import common_pb2

_log = logging.getLogger(__name__)

_READY = grpc.ChannelConnectivity.READY
_IDLE = grpc.ChannelConnectivity.IDLE
#: Seconds a list of models is trusted before it is asked again.
MODELS_TTL = 10.0


@dataclass(frozen=True)
class Downstream:
    name: str
    target: str
    channel: grpc.aio.Channel
    models: ModelClient
    required: bool


class Mesh:
    """Channels and clients to the four services; call :meth:`start` before use."""

    def __init__(self, settings: Settings, config: ClientConfig | None = None) -> None:
        self.settings = settings
        self.config = config = config or ClientConfig()
        self._channels = Channels(config)
        #: The circuit breaker of each downstream that has one, by name.
        self.breakers: dict[str, Breaker] = {}
        self._downstreams: list[Downstream] = []
        self._states: dict[str, grpc.ChannelConnectivity] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._models: tuple[float, list[common_pb2.Model]] = (0.0, [])
        ch, br = self._open, self._breaker
        timeout = settings.timeout
        self.clients = Downstreams(
            embedding=EmbeddingClient(
                ch("embedding", EmbeddingClient.SERVICE), timeout=timeout, breaker=br("embedding")
            ),
            retrieval=RetrievalClient(
                ch("retrieval", RetrievalClient.SERVICE), timeout=timeout, breaker=br("retrieval")
            ),
            chat=ChatClient(ch("chat", ChatClient.SERVICE), timeout=timeout, breaker=br("chat")),
            rerank=(
                RerankClient(
                    ch("rerank", RerankClient.SERVICE), timeout=timeout, breaker=br("rerank")
                )
                if settings.rerank
                else None
            ),
        )

    def _open(self, name: str, service: str) -> grpc.aio.Channel:
        target = str(getattr(self.settings, name))
        channel = self._channels.get(target, [service, ModelClient.SERVICE])
        required = name != "rerank" or not self.settings.rerank_optional
        self._downstreams.append(
            Downstream(name, target, channel, ModelClient(channel, timeout=5.0), required)
        )
        return channel

    def _breaker(self, name: str) -> Breaker | None:
        breaker = Breaker.of(f"{name} ({getattr(self.settings, name)})", self.config)
        if breaker is not None:
            self.breakers[name] = breaker
        return breaker

    @property
    def downstreams(self) -> Sequence[Downstream]:
        return tuple(self._downstreams)

    async def start(self) -> None:
        for d in self._downstreams:
            self._states[d.name] = d.channel.get_state(try_to_connect=True)
            self._watchers.append(asyncio.create_task(self._watch(d), name=f"watch {d.name}"))

    async def close(self) -> None:
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers.clear()
        await self._channels.close()

    async def _watch(self, d: Downstream) -> None:
        state = self._states[d.name]
        while True:
            await d.channel.wait_for_state_change(state)
            state = d.channel.get_state(try_to_connect=True)
            if (state is _READY) != (self._states[d.name] is _READY):
                _log.info("%s (%s) is %s", d.name, d.target, state.name)
            self._states[d.name] = state
            if state is _IDLE:  # idle after a quiet spell: reconnect so readiness stays known
                state = d.channel.get_state(try_to_connect=True)

    def states(self) -> dict[str, str]:
        """Each downstream's connectivity: READY means a replica is SERVING."""
        return {d.name: self._states.get(d.name, _IDLE).name for d in self._downstreams}

    def ready(self) -> bool:
        """Every required downstream has a SERVING replica."""
        return all(self._states.get(d.name) is _READY for d in self._downstreams if d.required)

    async def is_ready(self) -> bool:
        return self.ready()

    # -- models ---------------------------------------------------------------------------------

    async def models(self, *, fresh: bool = False) -> list[common_pb2.Model]:
        """Every model the downstreams serve (cached for a few seconds)."""
        at, cached = self._models
        if not fresh and cached and time.monotonic() - at < MODELS_TTL:
            return cached
        replies = await asyncio.gather(
            *(d.models.list_models() for d in self._downstreams), return_exceptions=True
        )
        found: dict[str, common_pb2.Model] = {}
        failures = []
        for d, reply in zip(self._downstreams, replies, strict=True):
            if isinstance(reply, BaseException):
                if isinstance(reply, grpc.aio.AioRpcError | ServiceError):
                    failures.append(f"{d.name}: {reply}")
                    continue
                raise reply
            for model in reply.models:
                found.setdefault(model.id, model)
        if failures and not found:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "no downstream answered: " + "; ".join(failures)
            )
        models = list(found.values())
        self._models = (time.monotonic(), models)
        return models

    async def model(self, model_id: str, kind: common_pb2.ModelKind.ValueType) -> common_pb2.Model:
        """The model ``model_id`` of ``kind``; NOT_FOUND (``model_not_found``) otherwise."""
        for fresh in (False, True):
            for m in await self.models(fresh=fresh):
                if m.id == model_id and (m.kind == kind or not m.kind):
                    return m
        known = [m.id for m in await self.models() if m.kind == kind]
        raise ServiceError(
            grpc.StatusCode.NOT_FOUND,
            f"The model {model_id!r} does not exist; this gateway serves "
            + (", ".join(repr(k) for k in known) or "none of that kind"),
        )
