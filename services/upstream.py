"""A pooled HTTP client for an OpenAI-compatible upstream (vLLM, TGI, TEI, Ollama, OpenAI ...).

One client per backend, opened at start and closed at stop. Calls are bounded by the request's
deadline (:mod:`opea_grpc.deadline`), retried with backoff on 429/503 and connection failures
while time remains, and failures become :class:`ServiceError` with the status that says what
happened: 429 -> RESOURCE_EXHAUSTED, 404 -> NOT_FOUND, 408 -> DEADLINE_EXCEEDED, other 4xx ->
INVALID_ARGUMENT, 5xx and connection failures -> UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import httpx

from opea_grpc import deadline
from opea_grpc.errors import ServiceError

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({429, 503})
#: Failures where the request never reached the upstream: safe to send again. A read timeout is
#: not among them: the upstream may still be generating, and a retry would pay for it twice.
_NOT_DELIVERED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str
    api_key: str = ""
    #: Seconds a whole call may take (shortened to the request's deadline).
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_connections: int = 64
    #: Extra attempts on 429/503 and connection failures.
    max_retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 4.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://, got {self.base_url!r}")


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:500]
        return str(error)[:500]
    return str(body)[:500]


def status_error(response: httpx.Response) -> ServiceError:
    """The ServiceError for an upstream's error response."""
    status = response.status_code
    text = f"upstream answered HTTP {status}: {_message(response)}"
    if status == 429:
        retry_after = response.headers.get("retry-after", "")
        meta = (("retry-after", retry_after),) if retry_after else ()
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, text, trailing_metadata=meta)
    if status == 404:
        return ServiceError(grpc.StatusCode.NOT_FOUND, text)
    if status == 408:
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, text)
    if status in (401, 403):
        text += " (the upstream refused this service's credentials: check its API key setting)"
    if 400 <= status < 500:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, text)
    return ServiceError(grpc.StatusCode.UNAVAILABLE, text)


def _transport_error(exc: httpx.TransportError, url: str) -> ServiceError:
    if isinstance(exc, httpx.TimeoutException):
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"upstream {url} timed out")
    return ServiceError(grpc.StatusCode.UNAVAILABLE, f"upstream {url} unreachable: {exc!r}")


class UpstreamSettings(Protocol):
    """The fields a service's settings carry for an upstream (``OPEA_<NAME>_BASE_URL`` ...)."""

    @property
    def base_url(self) -> str: ...
    @property
    def api_key(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def max_retries(self) -> int: ...
    @property
    def backoff(self) -> float: ...


def upstream_for(settings: UpstreamSettings) -> Upstream:
    """The client for the upstream that ``settings`` describe."""
    return Upstream(
        UpstreamConfig(
            base_url=settings.base_url,
            api_key=settings.api_key,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            backoff=settings.backoff,
        )
    )


class Upstream:
    """Calls to one OpenAI-compatible server."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        cfg = self.config
        headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=cfg.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
            limits=httpx.Limits(
                max_connections=cfg.max_connections,
                max_keepalive_connections=cfg.max_connections,
            ),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "upstream client is not started")
        return self._client

    async def reachable(self, path: str = "/v1/models") -> bool:
        """Whether the upstream answers at all (any HTTP status below 500)."""
        try:
            response = await self.client.get(path, timeout=min(2.0, self.config.timeout))
        except (httpx.TransportError, ServiceError):
            return False
        return response.status_code < 500

    def _timeout(self) -> float:
        seconds = deadline.bound(self.config.timeout)
        if seconds <= 0:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "no time left for the upstream")
        return seconds

    async def _retry(self, attempt: int, exc: httpx.TransportError) -> bool:
        """Back off before resending after a transport failure, if it is safe to resend."""
        return isinstance(exc, _NOT_DELIVERED) and await self._backoff(attempt, None)

    async def _backoff(self, attempt: int, response: httpx.Response | None) -> bool:
        """Sleep before the next attempt; False when there is no attempt or time left."""
        if attempt >= self.config.max_retries:
            return False
        delay = min(self.config.max_backoff, self.config.backoff * 2**attempt)
        delay *= 0.5 + random.random() / 2  # jitter, so retries from many callers spread out
        if response is not None:
            # Retry-After in seconds; the HTTP-date form is rare upstream and left to backoff.
            with contextlib.suppress(ValueError):
                delay = max(delay, float(response.headers.get("retry-after", "")))
        left = deadline.remaining()
        if delay >= (self.config.timeout if left is None else left):
            return False
        await asyncio.sleep(delay)
        return True

    async def post(self, path: str, payload: Mapping[str, Any]) -> Any:
        """POST JSON, return the decoded JSON reply."""
        attempt = 0
        while True:
            try:
                response = await self.client.post(path, json=payload, timeout=self._timeout())
            except httpx.TransportError as exc:
                if not await self._retry(attempt, exc):
                    raise _transport_error(exc, path) from exc
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise ServiceError(
                            grpc.StatusCode.UNAVAILABLE, f"upstream {path} sent invalid JSON"
                        ) from None
                if response.status_code not in _RETRY_STATUSES or not await self._backoff(
                    attempt, response
                ):
                    raise status_error(response)
            attempt += 1

    async def stream(self, path: str, payload: Mapping[str, Any]) -> AsyncGenerator[Any, None]:
        """POST JSON and yield each server-sent event's JSON data until ``[DONE]``.

        Closing the iterator (or cancelling its consumer) closes the HTTP connection at once,
        so the upstream stops generating. Retries happen only before the first event.
        """
        attempt = 0
        while True:
            request = self.client.build_request("POST", path, json=payload, timeout=self._timeout())
            try:
                response = await self.client.send(request, stream=True)
            except httpx.TransportError as exc:
                if not await self._retry(attempt, exc):
                    raise _transport_error(exc, path) from exc
                attempt += 1
                continue
            try:
                if response.status_code >= 400:
                    await response.aread()
                    if response.status_code in _RETRY_STATUSES and await self._backoff(
                        attempt, response
                    ):
                        attempt += 1
                        continue
                    raise status_error(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise ServiceError(
                            grpc.StatusCode.UNAVAILABLE, f"upstream {path} sent invalid JSON"
                        ) from None
                    if isinstance(event, dict) and "error" in event:
                        raise ServiceError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"upstream failed mid-stream: {event['error']}",
                        )
                    yield event
                return
            except httpx.TransportError as exc:
                raise _transport_error(exc, path) from exc
            finally:
                await response.aclose()
