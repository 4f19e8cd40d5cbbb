"""compose.yaml's services, run as local processes from the image's files, answer through the
gateway; their healthchecks pass; the index outlives a restart in its volume; they stop cleanly.

Docker is not needed: :mod:`tests.deploy.topology` runs every service's own ``command`` with its
own ``environment`` (interpolated as Compose does, with no variables set), from a wheel built out
of the build context ``.dockerignore`` leaves, with the Dockerfile's runtime ``ENV``. Containers'
addresses become loopback ports, one per service port, and named volumes temporary directories;
that module's docstring lists every substitution.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from gateway.launcher import SAMPLE_QUESTION
from tests.deploy.compose import COMPOSE_FILE, Project
from tests.deploy.topology import Image, Local, all_healthy, localize, run, running, stop_all

pytestmark = pytest.mark.slow

SERVICES = ("embedding", "retrieval", "rerank", "chat")


def ask(rest: str, question: str) -> tuple[str, list[dict[str, object]]]:
    """The answer and its sources, through the official SDK, with the chat model listed."""
    client = OpenAI(base_url=f"{rest}/v1", api_key="unused", max_retries=0)
    model = next(m.id for m in client.models.list() if m.id.startswith("extractive"))
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}]
    )
    assert completion.model_extra is not None
    return completion.choices[0].message.content or "", completion.model_extra["opea"]["sources"]


def rest_url(gateway: Local) -> str:
    # The gateway's container port for REST, mapped to its loopback port here.
    return f"http://127.0.0.1:{gateway.port(8888)}"


async def test_compose_services_answer_through_the_gateway(image: Image, tmp_path: Path) -> None:
    project = Project.load(COMPOSE_FILE, {})
    services = localize(project, image, tmp_path)
    assert sorted(services) == sorted([*SERVICES, "gateway"])
    sample = image.site / "gateway" / "sample"
    names = {p.name for p in sample.glob("*.md")} - {"README.md"}
    assert names, "the image carries the sample guide"

    gateway = services["gateway"]
    code, out = await run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        gateway.env,
        30,
        gateway.cwd,
    )
    assert code == 0, out
    assert Path(out.strip()).is_relative_to(image.site), "the processes run the image's files"

    async with running(services):
        await all_healthy(services)
        for name in SERVICES:  # what the Kubernetes liveness probes ask
            check = services[name].healthcheck
            assert check is not None
            code, out = await run(
                [*check, "--service", "opea.v1.ModelService"], services[name].env, 30
            )
            assert code == 0, out

        rest = rest_url(gateway)
        code, out = await run(
            [str(image.bin / "opea-grpc"), "ingest", str(sample), "--url", rest, "--quiet"],
            gateway.env,
            timeout=300,
        )
        assert code == 0, out
        answer, sources = await asyncio.to_thread(ask, rest, SAMPLE_QUESTION)
        assert "[1]" in answer, answer
        cited = {str(s["metadata"]["source"]) for s in sources}  # type: ignore[index]
        assert cited, sources
        assert {Path(c).name for c in cited} <= names, cited

        async with httpx.AsyncClient(timeout=10) as http:
            for name in SERVICES:
                metrics = await http.get(f"http://127.0.0.1:{services[name].port(9464)}/metrics")
                assert metrics.status_code == 200, name
                assert "# TYPE" in metrics.text, name
            metrics = await http.get(f"{rest}/metrics")
            assert metrics.status_code == 200
        await stop_all(services)

    index = tmp_path / "volumes" / "retrieval-data" / "retrieval"
    assert any(index.iterdir()), "the index is in the retrieval-data volume"

    # Again, on the same volumes: the documents are still there, nothing ingested this time.
    async with running(services):
        await all_healthy(services)
        answer, sources = await asyncio.to_thread(
            ask, rest_url(services["gateway"]), SAMPLE_QUESTION
        )
        assert "[1]" in answer, answer
        assert sources
        await stop_all(services)
