"""Settings: frozen, validated dataclasses built once at the entrypoint from env and flags.

No other module reads ``os.environ``. Each field ``foo_bar`` of a settings class is read from
``OPEA_FOO_BAR`` (or another prefix); flags override the environment; an explicit ``0`` stays
``0`` (defaults apply only when a value is absent).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from opea_grpc.keys import is_digest

T = TypeVar("T")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class ConfigError(ValueError):
    """A setting that is missing, malformed or out of range; the message names it."""


def parse_bool(text: str, *, name: str = "value") -> bool:
    """Strict boolean: true/false, 1/0, yes/no, on/off; anything else is an error."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {text!r}")


def _parse(text: str, kind: Any, name: str) -> object:
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.strip() == "":
            return None
        return _parse(text, inner[0], name)
    if kind is bool:
        return parse_bool(text, name=name)
    if kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {text!r}") from None
    if origin is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def load(
    cls: type[T],
    env: Mapping[str, str],
    *,
    prefix: str | Sequence[str] = "OPEA_",
    defaults: Mapping[str, object] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> T:
    """Build settings class ``cls``: ``defaults``, then ``env``, then ``overrides``.

    A field ``foo`` is read from ``PREFIX + "FOO"``; with several prefixes the later ones win
    (``("OPEA_", "OPEA_EMBEDDING_")``: a service's own variable beats the shared one).
    Overrides whose value is None are ignored, so unset CLI flags leave the env value in place.

    >>> load(ServerConfig, {"OPEA_PORT": "7000"}, overrides={"host": "127.0.0.1"}).port
    7000
    """
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = dict(defaults or {})
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        for p in prefixes:
            key = p + field.name.upper()
            if key in env:
                values[field.name] = _parse(env[key], hints[field.name], key)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


#: Room for a Unix socket's path, its terminating NUL included (``sun_path`` on Linux).
UNIX_PATH_MAX = 108


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How a :class:`~opea_grpc.MicroService` serves (``OPEA_*`` environment variables)."""

    host: str = "127.0.0.1"
    port: int = 0
    #: Largest message received or sent, in bytes.
    max_message_bytes: int = 16 * 1024 * 1024
    #: Server pings an idle connection after this many seconds; drops it when unanswered.
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    #: Refuse calls beyond this many in flight (0: unlimited).
    max_concurrent_rpcs: int = 0
    #: Close each client connection after this many seconds (gracefully: calls in flight get
    #: ``grace`` to finish), so that clients resolve the name again and find replicas added
    #: since (0: connections live as long as the client keeps them).
    max_connection_age: float = 0.0
    #: Seconds between readiness checks of the backends.
    health_interval: float = 5.0
    health_timeout: float = 2.0
    #: On stop, seconds to advertise NOT_SERVING while still serving, so balancers move away.
    drain_delay: float = 0.0
    #: On stop, seconds in-flight calls get to finish.
    grace: float = 10.0
    #: Threads numpy's BLAS may use in this process (0: the library's default, one per core).
    #: One suits several services sharing a machine: idle BLAS threads spin against each other.
    blas_threads: int = 1
    #: Serve Prometheus metrics of every call at ``http://host:metrics_port/metrics`` (0: off).
    metrics_port: int = 0
    #: TLS: PEM certificate chain and key (both, or neither for plaintext); with
    #: ``tls_client_auth`` clients must present a certificate signed by ``tls_ca``.
    tls_cert: str = ""
    tls_key: str = dataclasses.field(default="", repr=False)
    tls_ca: str = ""
    tls_client_auth: bool = False
    #: Service-to-service keys: ``sha256:<hex>`` digests of the keys callers must present
    #: (``authorization: Bearer KEY``); empty: none needed. See :mod:`opea_grpc.keys`.
    service_keys: tuple[str, ...] = ()
    #: Also listen on this Unix domain socket (empty: TCP only). Callers on the same machine
    #: reach the server as ``unix:PATH``, which costs less CPU per call than loopback TCP;
    #: the TCP port still serves everyone else (grpcurl, probes, other machines).
    unix_socket: str = ""

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"OPEA_PORT: {self.port} is not a port (0-65535)")
        _check(
            len(self.unix_socket.encode()) < UNIX_PATH_MAX,
            f"OPEA_UNIX_SOCKET: {self.unix_socket!r} is longer than a socket path may be "
            f"({UNIX_PATH_MAX - 1} bytes): choose a shorter one",
        )
        _check(
            0 <= self.metrics_port <= 65535,
            f"OPEA_METRICS_PORT: {self.metrics_port} is not a port (0-65535, 0: off)",
        )
        _check(self.max_message_bytes > 0, "OPEA_MAX_MESSAGE_BYTES must be positive")
        _check(self.keepalive_time > 0, "OPEA_KEEPALIVE_TIME must be positive")
        _check(self.keepalive_timeout > 0, "OPEA_KEEPALIVE_TIMEOUT must be positive")
        _check(self.max_concurrent_rpcs >= 0, "OPEA_MAX_CONCURRENT_RPCS must be >= 0")
        _check(self.max_connection_age >= 0, "OPEA_MAX_CONNECTION_AGE must be >= 0")
        _check(self.health_interval > 0, "OPEA_HEALTH_INTERVAL must be positive")
        _check(self.health_timeout > 0, "OPEA_HEALTH_TIMEOUT must be positive")
        _check(self.drain_delay >= 0, "OPEA_DRAIN_DELAY must be >= 0")
        _check(self.grace >= 0, "OPEA_GRACE must be >= 0")
        _check(self.blas_threads >= 0, "OPEA_BLAS_THREADS must be >= 0")
        _check(
            bool(self.tls_cert) == bool(self.tls_key),
            "OPEA_TLS_CERT and OPEA_TLS_KEY go together: set both for TLS, neither for plaintext",
        )
        _check(
            not self.tls_client_auth or bool(self.tls_ca and self.tls_cert),
            "OPEA_TLS_CLIENT_AUTH needs OPEA_TLS_CA (the CA client certificates must be signed "
            "by) and the server's own OPEA_TLS_CERT / OPEA_TLS_KEY",
        )

        for key in self.service_keys:
            _check(
                is_digest(key),
                f"OPEA_SERVICE_KEYS: {key[:12]!r}... is not a sha256:<64 hex digits> digest "
                "(opea-grpc keys service makes a key and its digest)",
            )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a channel to a downstream behaves (``OPEA_CLIENT_*`` environment variables)."""

    #: Default per-call timeout in seconds, when the caller gives none.
    timeout: float = 10.0
    #: Attempts per call for retryable (idempotent) methods, first one included (1: no retry).
    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    backoff_multiplier: float = 2.0
    #: Retry throttling: retries stop while failures outweigh successes (gRPC A6 token bucket).
    retry_max_tokens: int = 10
    retry_token_ratio: float = 0.1
    #: Spread calls over every address of a target, skipping replicas whose health is not SERVING.
    round_robin: bool = True
    health_check: bool = True
    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    #: A circuit breaker per downstream target (:mod:`opea_grpc.breaker`): it opens once at least
    #: ``breaker_min_calls`` calls within ``breaker_window`` seconds saw ``breaker_failure_ratio``
    #: of them fail, fails calls fast for ``breaker_open_time`` seconds, then lets
    #: ``breaker_probes`` calls at a time test the downstream.
    breaker: bool = True
    breaker_failure_ratio: float = 0.5
    breaker_min_calls: int = 20
    breaker_window: float = 10.0
    breaker_open_time: float = 5.0
    breaker_probes: int = 1
    #: A call given fewer seconds than this that times out counts neither way.
    breaker_min_deadline: float = 1.0
    #: TLS to the servers: on with ``tls`` or a CA or a client certificate. ``tls_ca`` is the
    #: CA to trust (default: the system's); ``tls_cert``/``tls_key`` answer mutual TLS;
    #: ``tls_server_name`` checks that name instead of the target's host (say, an IP target).
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = dataclasses.field(default="", repr=False)
    tls_server_name: str = ""
    #: The service-to-service key sent on every call (servers with ``OPEA_SERVICE_KEYS``).
    service_key: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        _check(self.timeout > 0, "OPEA_CLIENT_TIMEOUT must be positive")
        _check(
            bool(self.tls_cert) == bool(self.tls_key),
            "OPEA_CLIENT_TLS_CERT and OPEA_CLIENT_TLS_KEY go together: set both or neither",
        )
        _check(1 <= self.max_attempts <= 5, "OPEA_CLIENT_MAX_ATTEMPTS must be 1..5 (gRPC's cap)")
        _check(self.initial_backoff > 0, "OPEA_CLIENT_INITIAL_BACKOFF must be positive")
        _check(self.max_backoff >= self.initial_backoff, "OPEA_CLIENT_MAX_BACKOFF < initial")
        _check(self.backoff_multiplier >= 1, "OPEA_CLIENT_BACKOFF_MULTIPLIER must be >= 1")
        _check(1 <= self.retry_max_tokens <= 1000, "OPEA_CLIENT_RETRY_MAX_TOKENS must be 1..1000")
        _check(self.retry_token_ratio > 0, "OPEA_CLIENT_RETRY_TOKEN_RATIO must be positive")
        _check(self.max_message_bytes > 0, "OPEA_CLIENT_MAX_MESSAGE_BYTES must be positive")
        _check(self.keepalive_time > 0, "OPEA_CLIENT_KEEPALIVE_TIME must be positive")
        _check(self.keepalive_timeout > 0, "OPEA_CLIENT_KEEPALIVE_TIMEOUT must be positive")
        _check(
            0 < self.breaker_failure_ratio <= 1,
            "OPEA_CLIENT_BREAKER_FAILURE_RATIO must be in (0, 1]",
        )
        _check(self.breaker_min_calls >= 1, "OPEA_CLIENT_BREAKER_MIN_CALLS must be >= 1")
        _check(self.breaker_window > 0, "OPEA_CLIENT_BREAKER_WINDOW must be positive")
        _check(self.breaker_open_time > 0, "OPEA_CLIENT_BREAKER_OPEN_TIME must be positive")
        _check(self.breaker_probes >= 1, "OPEA_CLIENT_BREAKER_PROBES must be >= 1")
        _check(self.breaker_min_deadline >= 0, "OPEA_CLIENT_BREAKER_MIN_DEADLINE must be >= 0")
