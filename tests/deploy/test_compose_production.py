"""compose.yaml with ``deploy/compose/production.env``: the same services, switched to their
production backends by that file alone, answer through the gateway, calling vLLM, TEI and
PostgreSQL where the compose file says they are, and send their spans to the collector.

The services run as in ``test_compose_run`` (:mod:`tests.deploy.topology`). What the profiles
would start is stood in for on loopback: an OpenAI-protocol fake (``tests/openai_fake.py``) for
vLLM and for each TEI server, a PostgreSQL with pgvector from the ``pgserver`` wheel
(``tests/services/pg.py``) given the user and database the ``postgres`` service creates, and an
OTLP/gRPC trace receiver for the collector.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from openai import OpenAI
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.deploy.compose import COMPOSE_FILE, PRODUCTION_ENV, Project, env_file
from tests.deploy.topology import Image, all_healthy, localize, run, running, stop_all
from tests.openai_fake import FakeOpenAI
from tests.services.pg import PostgresServer

pytestmark = pytest.mark.slow

SERVICES = ("embedding", "retrieval", "rerank", "chat", "gateway")


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts the spans each service (by ``service.name``) sends over OTLP/gRPC."""

    def __init__(self) -> None:
        self.spans: dict[str, int] = defaultdict(int)
        self.arrived = asyncio.Event()

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            names = [
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            ]
            for scope in resource_spans.scope_spans:
                self.spans[names[0] if names else ""] += len(scope.spans)
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, services: set[str], timeout: float) -> None:
        async def every() -> None:
            while not services <= self.spans.keys():
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(every(), timeout)


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(None)


def port_of(fake: FakeOpenAI) -> int:
    return int(fake.base_url.rsplit(":", 1)[1])


async def as_compose_creates_it(pg: PostgresServer, env: dict[str, str | None]) -> None:
    """The role and database the postgres image makes from POSTGRES_USER / _PASSWORD / _DB."""
    user, password, db = (env[k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"))
    connection = await asyncpg.connect(pg.dsn)
    try:
        # The image's POSTGRES_USER is a superuser: it may create the vector extension.
        await connection.execute(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{password}'")
        await connection.execute(f"CREATE DATABASE {db} OWNER {user}")
    finally:
        await connection.close()


def ask(rest: str, model: str, question: str) -> tuple[str, list[dict[str, object]]]:
    client = OpenAI(base_url=f"{rest}/v1", api_key="unused", max_retries=0)
    assert model in [m.id for m in client.models.list()]
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}]
    )
    assert completion.model_extra is not None
    return completion.choices[0].message.content or "", completion.model_extra["opea"]["sources"]


async def test_production_env_switches_every_backend(image: Image, tmp_path: Path) -> None:
    project = Project.load(COMPOSE_FILE, env_file(PRODUCTION_ENV))
    chat_model = project.environment("chat")["OPEA_CHAT_MODEL"]
    embedding_model = project.environment("embedding")["OPEA_EMBEDDING_MODEL"]
    rerank_model = project.environment("rerank")["OPEA_RERANK_MODEL"]
    assert chat_model
    assert embedding_model
    assert rerank_model
    question = "How do I check that a service is healthy?"

    async with (
        FakeOpenAI(model=chat_model) as vllm,
        FakeOpenAI(model=embedding_model) as tei_embedding,
        FakeOpenAI(model=rerank_model) as tei_rerank,
        PostgresServer() as pg,
        collector() as (spans, otlp_port),
    ):
        await as_compose_creates_it(pg, project.environment("postgres"))
        standins = {
            ("vllm", 8000): port_of(vllm),
            ("tei-embedding", 80): port_of(tei_embedding),
            ("tei-rerank", 80): port_of(tei_rerank),
            ("postgres", 5432): pg.port,
            ("otel-collector", 4317): otlp_port,
        }
        services = localize(project, image, tmp_path, standins=standins)
        assert sorted(services) == sorted(SERVICES)
        async with running(services):
            await all_healthy(services)
            gateway = services["gateway"]
            rest = f"http://127.0.0.1:{gateway.port(8888)}"
            sample = image.site / "gateway" / "sample"
            code, out = await run(
                [str(image.bin / "opea-grpc"), "ingest", str(sample), "--url", rest, "--quiet"],
                gateway.env,
                300,
            )
            assert code == 0, out

            answer, sources = await asyncio.to_thread(ask, rest, chat_model, question)
            assert answer == f"echo: {question}"  # what the LLM stand-in says
            assert sources, "retrieval (pgvector) found passages"

            # Each upstream was called as its compose service is, with the model it serves.
            chats = [body for path, body in vllm.requests if path == "/v1/chat/completions"]
            assert chats[-1]["model"] == chat_model
            context = " ".join(str(m["content"]) for m in chats[-1]["messages"])
            for source in sources:
                assert str(source["text"])[:80] in context
            embeds = [body for path, body in tei_embedding.requests if path == "/v1/embeddings"]
            assert {body["model"] for body in embeds} == {embedding_model}
            assert [path for path, _ in tei_rerank.requests if path == "/rerank"]

            connection = await asyncpg.connect(pg.dsn.rsplit("/", 1)[0] + "/opea")
            try:
                tables = await connection.fetchval(
                    "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
                    "('pg_catalog', 'information_schema')"
                )
            finally:
                await connection.close()
            assert tables > 0, "the index is in the compose database"

            await spans.wait_for({f"opea-{name}" for name in SERVICES}, timeout=60)
            await stop_all(services)
