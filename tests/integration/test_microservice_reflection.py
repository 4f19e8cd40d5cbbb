"""A running MicroService is discoverable and callable with third-party reflection clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from google.protobuf import descriptor_pool
from grpc_requests import Client

from opea_grpc.demo import OverlapReranker
from opea_grpc.pb.v1 import rerank_pb2_grpc
from opea_grpc.reflection import REFLECTION_SERVICES
from opea_grpc.testing import serve

REQUEST = {"query": "typed grpc", "documents": [{"text": "bananas"}, {"text": "typed grpc"}]}


async def buf_curl(buf: str, *arguments: str) -> str:
    process = await asyncio.create_subprocess_exec(
        buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", *arguments,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_buf_curl_lists_and_calls_a_microservice(buf: str) -> None:
    adder = rerank_pb2_grpc.add_RerankServiceServicer_to_server
    async with serve((adder, OverlapReranker())) as served:
        listed = set((await buf_curl(buf, "--list-methods", f"http://{served.target}")).split())
        reply = json.loads(
            await buf_curl(
                buf,
                "-d",
                json.dumps(REQUEST),
                f"http://{served.target}/opea.v1.RerankService/Rerank",
            )
        )
    assert {
        "opea.v1.RerankService/Rerank",
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    } <= listed
    assert reply["model"] == "word-overlap"
    assert [r["document"]["text"] for r in reply["results"]] == ["typed grpc", "bananas"]
    assert reply["results"][0]["relevanceScore"] == 2


def grpc_requests_session(target: str) -> tuple[list[str], dict[str, Any]]:
    # A fresh pool, so the client learns the schema through reflection, not from this process.
    client = Client(target, descriptor_pool=descriptor_pool.DescriptorPool())
    try:
        return list(client.service_names), dict(
            client.request("opea.v1.RerankService", "Rerank", REQUEST, timeout=30)
        )
    finally:
        client.channel.close()


async def test_grpc_requests_lists_and_calls_a_microservice() -> None:
    adder = rerank_pb2_grpc.add_RerankServiceServicer_to_server
    async with serve((adder, OverlapReranker())) as served:
        services, reply = await asyncio.wait_for(
            asyncio.to_thread(grpc_requests_session, served.target), 60
        )
    assert services == sorted(
        ["opea.v1.RerankService", "grpc.health.v1.Health", *REFLECTION_SERVICES]
    )
    assert reply["model"] == "word-overlap"
    assert reply["results"][0]["document"]["text"] == "typed grpc"
