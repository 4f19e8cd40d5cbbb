"""Long-lived channels to downstream services.

A target may name one address or several replicas; gRPC resolves it::

    127.0.0.1:50051                         one address
    ipv4:127.0.0.1:7001,127.0.0.1:7002      a fixed replica list
    dns:///retrieval:50052                  every address the name resolves to

The channel's service config spreads calls round-robin over the replicas, skips those whose
health (``grpc.health.v1`` Watch, per service) is not SERVING, and retries UNAVAILABLE with
backoff for idempotent methods, throttled so that retries stop while a downstream keeps failing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

import grpc

from opea_grpc.config import ClientConfig
from opea_grpc.keys import bearer_interceptors
from opea_grpc.tls import channel_credentials

#: Methods whose retry cannot do harm, by service. Every method of our contracts is safe to
#: repeat: reads have no effect, upserts and deletes are idempotent by document id.
IDEMPOTENT: Mapping[str, Sequence[str]] = {
    "opea.v1.EmbeddingService": ("Embed",),
    "opea.v1.RetrievalService": (
        "Search",
        "SearchBatch",
        "Upsert",
        "Delete",
        "ListCollections",
        "DeleteCollection",
    ),
    "opea.v1.RerankService": ("Rerank", "RerankBatch"),
    "opea.v1.ChatService": ("Chat", "ChatStream"),
    "opea.v1.ChatQnAService": ("Ask", "AskStream"),
    "opea.v1.ModelService": ("ListModels",),
}


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def service_config(
    services: Iterable[str],
    config: ClientConfig,
    *,
    idempotent: Mapping[str, Sequence[str]] = IDEMPOTENT,
) -> dict[str, object]:
    """The gRPC service config for a channel that carries ``services``.

    Client-side health checking watches the first service named.
    """
    services = list(services)
    doc: dict[str, object] = {}
    if config.round_robin:
        doc["loadBalancingConfig"] = [{"round_robin": {}}]
        if config.health_check and services:
            doc["healthCheckConfig"] = {"serviceName": services[0]}
    names = [
        {"service": service, "method": method}
        for service in services
        for method in idempotent.get(service, ())
    ]
    if names and config.max_attempts > 1:
        doc["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": config.max_attempts,
                    "initialBackoff": _seconds(config.initial_backoff),
                    "maxBackoff": _seconds(config.max_backoff),
                    "backoffMultiplier": config.backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
        doc["retryThrottling"] = {
            "maxTokens": config.retry_max_tokens,
            "tokenRatio": config.retry_token_ratio,
        }
    return doc


def channel_options(services: Iterable[str], config: ClientConfig) -> list[tuple[str, str | int]]:
    return [
        ("grpc.service_config", json.dumps(service_config(services, config))),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Our service config wins over one published in DNS TXT records.
        ("grpc.service_config_disable_resolution", 1),
    ]


def connect(
    target: str,
    services: Iterable[str],
    config: ClientConfig | None = None,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """Open a channel to ``target`` for ``services`` (full names, e.g. ``opea.v1.ChatService``).

    The channel connects lazily and lives as long as the process; close it at shutdown.
    """
    cfg = config if config is not None else ClientConfig()
    options = channel_options(services, cfg)
    interceptors = (
        *interceptors,
        *(bearer_interceptors(cfg.service_key) if cfg.service_key else ()),
    )
    credentials = channel_credentials(cfg)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors or None)
    if cfg.tls_server_name:
        options.append(("grpc.ssl_target_name_override", cfg.tls_server_name))
    return grpc.aio.secure_channel(
        target, credentials, options=options, interceptors=interceptors or None
    )


class Channels:
    """One channel per downstream target, opened on first use and closed together.

    >>> channels = Channels(ClientConfig())
    >>> embedding = EmbeddingClient(channels.get("127.0.0.1:50051", [EmbeddingClient.SERVICE]))
    >>> await channels.close()
    """

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self.config = config if config is not None else ClientConfig()
        self._interceptors = tuple(interceptors)
        self._channels: dict[tuple[str, tuple[str, ...]], grpc.aio.Channel] = {}

    def get(self, target: str, services: Iterable[str]) -> grpc.aio.Channel:
        key = (target, tuple(services))
        channel = self._channels.get(key)
        if channel is None:
            channel = connect(target, key[1], self.config, interceptors=self._interceptors)
            self._channels[key] = channel
        return channel

    async def close(self, grace: float | None = None) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace)
