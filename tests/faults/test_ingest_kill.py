"""SIGKILL of the retrieval process during a bulk ingest through the gateway loses no acknowledged
document, and the restarted process serves them all through the gateway.

Writers post ``/v1/ingest`` batches concurrently; the retrieval process (local backend, on disk)
is killed once the acknowledged documents pass a count. Ingests in flight then fail (nothing
acknowledged them); every document of every 200 answer must be there after a restart on the same
directory and port. The service alone, with batch atomicity and a kill during an index build, is
``tests/services/test_retrieval_durability.py``.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from gateway.service import Settings as GatewaySettings
from gateway.service import build as build_gateway
from opea_grpc.channel import connect
from opea_grpc.client import RetrievalClient
from opea_grpc.config import ClientConfig, ServerConfig
from opea_grpc.pb.v1 import retrieval_pb2
from opea_grpc.testing import started
from services.embedding import service as embedding
from tests.faults import faulty
from tests.faults.load import eventually
from tests.faults.processes import serve_argv
from tests.processes import served

COLLECTION = "bulk"
WRITERS = 4
PER_REQUEST = 20
KILL_AFTER = 600  # acknowledged documents
#: The gateway probes a failed downstream again soon (OPEA_CLIENT_BREAKER_OPEN_TIME).
CLIENT = ClientConfig(breaker_open_time=0.5)


@pytest.mark.slow
async def test_sigkill_of_retrieval_during_an_ingest_loses_no_acknowledged_document(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **subprocess_env,
        "OPEA_RETRIEVAL_DATA_DIR": str(tmp_path / "index"),
        "OPEA_RETRIEVAL_MAX_TOP_K": "10000",
    }
    log = tmp_path / "retrieval.log"
    acked: set[str] = set()
    sent: list[int] = []  # the status of each ingest
    async with AsyncExitStack() as stack:
        retrieval = await stack.enter_async_context(
            served(env, *serve_argv("retrieval"), stderr=log)
        )
        services = {
            "embedding": embedding.build(faulty.LOOPBACK, embedding.Settings(backend="hashing")),
            "rerank": faulty.rerank(faulty.Faults()),
            "chat": faulty.chat(faulty.Faults()),
        }
        for service in services.values():
            await stack.enter_async_context(started(service))
        targets = {name: s.target for name, s in services.items()}
        settings = GatewaySettings(rest_port=0, retrieval=retrieval.target, **targets)  # type: ignore[arg-type]
        gw = build_gateway(ServerConfig(host="127.0.0.1", port=0), settings, CLIENT)
        await gw.start()
        stack.push_async_callback(gw.stop, 0)
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=gw.rest.url, timeout=60))
        killed = asyncio.Event()

        async def write(writer: int) -> None:
            number = 0
            while not killed.is_set() and number < 1000:  # bounded: the kill comes far sooner
                documents = [
                    {"id": f"w{writer}-{number}-{i}", "text": f"writer {writer} batch {number}"}
                    for i in range(PER_REQUEST)
                ]
                number += 1
                reply = await http.post(
                    "/v1/ingest", json={"documents": documents, "collection": COLLECTION}
                )
                sent.append(reply.status_code)
                if reply.status_code != 200:
                    assert killed.is_set(), f"an ingest failed before the kill: {reply.text}"
                    return
                acked.update(d["id"] for d in documents)
                if len(acked) >= KILL_AFTER and not killed.is_set():
                    retrieval.proc.send_signal(signal.SIGKILL)  # right after this answer
                    killed.set()

        await asyncio.gather(*(write(w) for w in range(WRITERS)))
        assert await retrieval.proc.wait() == -signal.SIGKILL
        print(
            f"SIGKILL retrieval during ingest: {len(sent)} ingests sent,"
            f" {len(sent) - sent.count(200)} failed after the kill (none acknowledged),"
            f" {len(acked)} documents acknowledged"
        )

        back = await stack.enter_async_context(
            served(env, *serve_argv("retrieval", retrieval.port), stderr=log)
        )

        async def listed() -> bool:
            return (await http.get("/v1/collections")).status_code == 200

        assert await eventually(listed, timeout=60), "the gateway never reached retrieval again"
        counts = {
            c["name"]: c["document_count"]
            for c in (await http.get("/v1/collections")).json()["data"]
        }
        channel = connect(back.target, [RetrievalClient.SERVICE])
        try:
            found = await RetrievalClient(channel).search(
                retrieval_pb2.SearchRequest(collection=COLLECTION, vector=[1.0] * 384, top_k=10000)
            )
        finally:
            await channel.close(None)
        present = {hit.document.id.split("#")[0] for hit in found.documents}
        assert counts[COLLECTION] == len(found.documents)
        assert acked <= present, f"{len(acked - present)} acknowledged documents were lost"

        some = sorted(acked)[len(acked) // 2]
        writer, number, _ = some.split("-")
        reply = await http.post(
            "/v1/search",
            json={"query": f"writer {writer[1:]} batch {number}", "collection": COLLECTION},
        )
        assert reply.status_code == 200, reply.text
        assert any(hit["id"].startswith(f"{writer}-{number}-") for hit in reply.json()["data"])
        assert await back.stop() == 0
    assert "Traceback" not in log.read_text()
