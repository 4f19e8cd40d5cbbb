"""TLS and mutual TLS for servers and channels, from PEM files named in the config.

A server with ``tls_cert`` and ``tls_key`` serves TLS only; with ``tls_client_auth`` it also
requires a client certificate signed by ``tls_ca``. A channel is secure when its config sets
``tls`` (or a CA, or a client certificate); it trusts ``tls_ca`` (else the system's roots) and
presents ``tls_cert``/``tls_key`` when the server asks.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from opea_grpc.config import ClientConfig, ConfigError, ServerConfig


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path!r}: {exc.strerror}") from None


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """The server's credentials, or None when it serves plaintext."""
    if not cfg.tls_cert:
        return None
    pair = (_read(cfg.tls_key, "OPEA_TLS_KEY"), _read(cfg.tls_cert, "OPEA_TLS_CERT"))
    ca = _read(cfg.tls_ca, "OPEA_TLS_CA") if cfg.tls_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=cfg.tls_client_auth
    )


def channel_credentials(cfg: ClientConfig) -> grpc.ChannelCredentials | None:
    """The channel's credentials, or None for a plaintext channel."""
    if not (cfg.tls or cfg.tls_ca or cfg.tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.tls_ca, "OPEA_CLIENT_TLS_CA") if cfg.tls_ca else None,
        private_key=_read(cfg.tls_key, "OPEA_CLIENT_TLS_KEY") if cfg.tls_key else None,
        certificate_chain=_read(cfg.tls_cert, "OPEA_CLIENT_TLS_CERT") if cfg.tls_cert else None,
    )
