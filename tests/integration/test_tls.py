"""TLS and mutual TLS: servers that refuse plaintext and strangers, and a pipeline that works."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.service import Settings as GatewaySettings
from gateway.service import build as build_gateway
from opea_grpc.certs import issue
from opea_grpc.channel import connect
from opea_grpc.client import RerankClient
from opea_grpc.config import ClientConfig, ConfigError, ServerConfig
from opea_grpc.pb.v1 import common_pb2, rerank_pb2
from opea_grpc.server import MicroService
from opea_grpc.testing import started
from services.rerank import service as rerank
from tests.gateway.conftest import default_services
from tests.processes import run_cli

REQUEST = rerank_pb2.RerankRequest(
    query="tls", documents=[common_pb2.Document(text="mutual tls between services")]
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA with certificates for the services, plus a stranger's CA and certificate."""
    root = tmp_path_factory.mktemp("pki")
    issue(root / "ours", ["embedding", "retrieval", "rerank", "chat", "gateway", "client"])
    issue(root / "theirs", ["client"])
    return root


def server_config(pki: Path, name: str, *, mutual: bool) -> ServerConfig:
    ours = pki / "ours"
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        grace=0.5,
        tls_cert=str(ours / f"{name}.pem"),
        tls_key=str(ours / f"{name}-key.pem"),
        tls_ca=str(ours / "ca.pem"),
        tls_client_auth=mutual,
    )


def client_config(pki: Path, *, ca: str = "ours", cert: str | None = None) -> ClientConfig:
    # No retries and no health checking: each attempt's own status is what the test sees.
    base = ClientConfig(tls_ca=str(pki / ca / "ca.pem"), max_attempts=1, health_check=False)
    if cert is None:
        return base
    return dataclasses.replace(
        base,
        tls_cert=str(pki / cert / "client.pem"),
        tls_key=str(pki / cert / "client-key.pem"),
    )


@asynccontextmanager
async def reranker(pki: Path, *, mutual: bool) -> AsyncIterator[MicroService]:
    service = rerank.build(server_config(pki, "rerank", mutual=mutual), rerank.Settings())
    await service.start()
    try:
        yield service
    finally:
        await service.stop(0)


async def status(target: str, config: ClientConfig) -> grpc.StatusCode:
    """How one Rerank call over a fresh channel ends (a refused handshake is UNAVAILABLE)."""
    channel = connect(target, [RerankClient.SERVICE], config)
    try:
        await RerankClient(channel).rerank(REQUEST, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close(None)
    return grpc.StatusCode.OK


OK, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


async def test_tls_server_serves_tls_clients_only(pki: Path) -> None:
    async with reranker(pki, mutual=False) as service:
        assert await status(service.target, client_config(pki)) is OK
        assert await status(service.target, ClientConfig(max_attempts=1)) is REFUSED  # plaintext
        assert await status(service.target, client_config(pki, ca="theirs")) is REFUSED


async def test_mutual_tls_refuses_clients_without_our_certificate(pki: Path) -> None:
    async with reranker(pki, mutual=True) as service:
        assert await status(service.target, client_config(pki, cert="ours")) is OK
        assert await status(service.target, client_config(pki)) is REFUSED  # no certificate
        assert await status(service.target, client_config(pki, cert="theirs")) is REFUSED


async def test_health_cli_speaks_tls(pki: Path, subprocess_env: dict[str, str]) -> None:
    async with reranker(pki, mutual=True) as service:
        env = {
            **subprocess_env,
            "OPEA_CLIENT_TLS_CA": str(pki / "ours" / "ca.pem"),
            "OPEA_CLIENT_TLS_CERT": str(pki / "ours" / "client.pem"),
            "OPEA_CLIENT_TLS_KEY": str(pki / "ours" / "client-key.pem"),
        }
        code, out, _ = await run_cli(env, "health", service.target)
        assert code == 0, out
        assert "SERVING" in out
        code, _, _ = await run_cli(subprocess_env, "health", service.target)
        assert code == 2  # a plaintext probe cannot reach it


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
async def test_the_pipeline_runs_over_tls(pki: Path, tmp_path: Path, mutual: bool) -> None:
    """Gateway and services all speak TLS only (and with ``mutual`` require client
    certificates); a chat request still answers, and strangers are refused."""
    services = default_services(tmp_path)
    for name, service in services.items():
        service.config = server_config(pki, name, mutual=mutual)
    client = client_config(pki, cert="ours") if mutual else client_config(pki)
    async with AsyncExitStack() as stack:
        for service in services.values():
            await stack.enter_async_context(started(service, client))
        targets = {name: s.target for name, s in services.items()}
        settings = GatewaySettings(
            embedding=targets["embedding"], retrieval=targets["retrieval"],
            rerank=targets["rerank"], chat=targets["chat"], rest_port=0,
        )  # fmt: skip
        gw = build_gateway(server_config(pki, "gateway", mutual=mutual), settings, client)
        await gw.start()
        stack.push_async_callback(gw.stop, 0)
        https = ssl.create_default_context(cafile=str(pki / "ours" / "ca.pem"))
        if mutual:
            https.load_cert_chain(pki / "ours" / "client.pem", pki / "ours" / "client-key.pem")
        assert gw.rest.url.startswith("https://")
        async with httpx.AsyncClient(base_url=gw.rest.url, verify=https) as http:
            for _ in range(100):
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            doc = {"id": "tls.md", "text": "Every hop of the mesh speaks mutual TLS."}
            assert (await http.post("/v1/ingest", json={"documents": [doc]})).status_code == 200
            reply = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "extractive-answerer",
                    "messages": [{"role": "user", "content": "What does every hop speak?"}],
                },
            )
        assert reply.status_code == 200, reply.text
        assert "mutual TLS" in reply.json()["choices"][0]["message"]["content"]
        # REST: with mutual TLS a client without a certificate is refused at the handshake;
        # either way a client that trusts another CA does not take the gateway for its server
        stranger = ssl.create_default_context(
            cafile=str(pki / ("ours" if mutual else "theirs") / "ca.pem")
        )
        async with httpx.AsyncClient(base_url=gw.rest.url, verify=stranger) as http:
            with pytest.raises(httpx.TransportError):
                await http.get("/healthz")
        # the same on the gateway's own gRPC face
        channel = grpc.aio.secure_channel(
            gw.target,
            grpc.ssl_channel_credentials(
                root_certificates=(pki / ("ours" if mutual else "theirs") / "ca.pem").read_bytes()
            ),
        )
        try:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        finally:
            await channel.close(None)


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="go together"):
        ServerConfig(tls_cert="a.pem")
    with pytest.raises(ConfigError, match="OPEA_TLS_CLIENT_AUTH needs"):
        ServerConfig(tls_client_auth=True)
    with pytest.raises(ConfigError, match="go together"):
        ClientConfig(tls_cert="c.pem")
