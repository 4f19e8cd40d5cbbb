"""compose.yaml scaled out (``docker compose up --scale embedding=2 --scale rerank=2 --scale
chat=2``): the gateway's ``dns:///NAME:PORT`` targets reach every replica, its calls spread over
them, and when a replica stops the others go on answering.

Names resolve here as in a compose network, where Docker's DNS answers a service's name with the
address of each of its containers: the services run as in ``test_compose_run``
(:mod:`tests.deploy.topology`), but the gateway's targets keep their service names, replica ``n``
of a service listens on ``127.0.0.n`` (all replicas on one port, as containers do), and each
process sees a hosts file naming every replica as its ``/etc/hosts``, bound over it in a mount
namespace of its own (``unshare``). That takes root; elsewhere the test is skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.compose import COMPOSE_FILE, Project
from tests.deploy.topology import Image, Local, all_healthy, localize, run, running, stop, stop_all

pytestmark = pytest.mark.slow

SCALE = {"embedding": 2, "rerank": 2, "chat": 2}
#: Each scaled service's method the pipeline calls.
CALLED = {
    "embedding": "opea.v1.EmbeddingService",
    "rerank": "opea.v1.RerankService",
    "chat": "opea.v1.ChatService",
}


def why_not_namespaces() -> str | None:
    """Why this machine cannot bind a hosts file over /etc/hosts for one process (or None)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and util-linux unshare (a mount namespace per process)"
    probe = subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"mount namespaces are not allowed here: {probe.stderr.strip()}"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError as exc:
        return f"cannot listen on 127.0.0.2: {exc}"
    return None


@pytest.fixture(scope="module")
def namespaces() -> None:
    reason = why_not_namespaces()
    if reason is not None:
        pytest.skip(reason)


def handled(text: str, service: str) -> float:
    """Calls of ``service`` a replica's /metrics counts as handled."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total" and sample.labels["grpc_service"] == service
    )


def ask(rest: str, questions: list[str]) -> list[str]:
    client = OpenAI(base_url=f"{rest}/v1", api_key="unused", max_retries=0)
    model = next(m.id for m in client.models.list() if m.id.startswith("extractive"))
    answers = []
    for question in questions:
        completion = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )
        answers.append(completion.choices[0].message.content or "")
    return answers


async def calls_per_replica(services: dict[str, Local]) -> dict[str, float]:
    counts = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for name, replica in services.items():
            if replica.service in CALLED:
                own = replica.env["OPEA_HOST"]
                reply = await http.get(f"http://{own}:{replica.port(9464)}/metrics")
                assert reply.status_code == 200, name
                counts[name] = handled(reply.text, CALLED[replica.service])
    return counts


async def test_replicas_are_reached_by_dns_round_robin(
    namespaces: None, image: Image, tmp_path: Path
) -> None:
    project = Project.load(COMPOSE_FILE, {})
    services = localize(project, image, tmp_path, replicas=SCALE, hosts=tmp_path / "hosts")
    assert sorted(services) == sorted(
        ["gateway", "retrieval", *SCALE, *(f"{name}-2" for name in SCALE)]
    )
    gateway = services["gateway"]
    for name in SCALE:  # the targets are names, as in compose.yaml
        port = services[name].env["OPEA_PORT"]
        assert gateway.env[f"OPEA_GATEWAY_{name.upper()}"] == f"dns:///{name}:{port}"
        assert services[f"{name}-2"].env["OPEA_HOST"] == "127.0.0.2"
    rest = f"http://127.0.0.1:{gateway.port(8888)}"

    async with running(services):
        await all_healthy(services)
        sample = image.site / "gateway" / "sample"
        code, out = await run(
            [str(image.bin / "opea-grpc"), "ingest", str(sample), "--url", rest, "--quiet"],
            gateway.env,
            300,
        )
        assert code == 0, out
        # Different questions: the gateway's cache answers none of them.
        questions = [f"How do I check that service {i} is healthy?" for i in range(12)]
        answers = await asyncio.to_thread(ask, rest, questions)
        assert all("[1]" in a for a in answers), answers

        counts = await calls_per_replica(services)
        assert all(count > 0 for count in counts.values()), counts

        # One chat replica goes away (compose scales down, or it is replaced): answers go on.
        assert await stop(services["chat-2"]) == 0
        answers = await asyncio.to_thread(
            ask, rest, [f"What is {i} in the guide?" for i in range(4)]
        )
        assert len(answers) == 4
        remaining = {n: s for n, s in services.items() if n != "chat-2"}
        await stop_all(remaining)
