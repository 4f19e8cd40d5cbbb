"""The REST server: uvicorn on a socket the gateway binds, started and stopped with the service.

Signal handling stays with the entrypoint (``opea-grpc serve``): this server never installs any.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from opea_grpc.config import ServerConfig

_log = logging.getLogger(__name__)


def _http_implementation() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover - the pure-Python parser works, only slower
        return "h11"
    return "httptools"


class RestServer:
    """Serves ``app`` on ``host:port`` (0: any free port) from :meth:`start` to :meth:`stop`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str,
        port: int,
        name: str = "gateway",
        tls: ServerConfig | None = None,
    ) -> None:
        self.app, self.host = app, host
        self._tls = tls if tls is not None and tls.tls_cert else None
        self._wanted = port
        self._name = name
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def _ssl(self) -> dict[str, Any]:
        """uvicorn's TLS settings: the gRPC face's certificate, and its client-auth rule."""
        tls = self._tls
        if tls is None:
            return {}
        return {
            "ssl_certfile": tls.tls_cert,
            "ssl_keyfile": tls.tls_key,
            "ssl_ca_certs": tls.tls_ca or None,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.tls_client_auth else ssl.CERT_NONE,
        }

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that name it, and
        # without it Nagle's algorithm holds small responses for a delayed ACK (~40 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self._wanted))
        except OSError as exc:
            sock.close()
            raise OSError(
                f"{self._name} REST cannot bind {self.host}:{self._wanted}: {exc.strerror}"
            ) from None
        sock.listen(2048)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        sock = self._socket = self._bind()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http=_http_implementation(),
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,  # no per-request X-Forwarded-* parsing: nothing here reads it
            timeout_keep_alive=30,
            **self._ssl(),
        )
        config.load()
        server = self._server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._loop = asyncio.create_task(server.main_loop(), name=f"{self._name} REST")
        print(f"{self._name} REST listening on {self.url}", flush=True)

    async def stop(self) -> None:
        server, loop, sock = self._server, self._loop, self._socket
        self._server = self._loop = self._socket = None
        if server is None:
            return
        server.should_exit = True
        if loop is not None:
            await loop
        await server.shutdown(sockets=[sock] if sock is not None else None)
        if sock is not None:
            sock.close()
