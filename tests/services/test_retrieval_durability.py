"""The local retrieval index as a process: every acknowledged Upsert survives ``kill -9``.

``python -m services.retrieval --port 0 --backend local`` runs with ``OPEA_RETRIEVAL_DATA_DIR``
in a temporary directory while four clients upsert batches concurrently; the process is killed
with SIGKILL the moment the acknowledgements pass a count, then started again on the same
directory. Every acknowledged document must be there, and each batch that was in flight must be
there whole or not at all. A low ``ann_threshold`` makes the HNSW graph build (and save) in the
background meanwhile, so the kill may land in the middle of that too. The restarted process is
then probed with ``opea-grpc health`` and stopped with SIGTERM, which must exit 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import numpy as np

from opea_grpc.channel import connect
from opea_grpc.client import RetrievalClient
from opea_grpc.config import ClientConfig
from opea_grpc.pb.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from tests.processes import Served, health, served

DIM = 8
BATCH = 50
WRITERS = 4
KILL_AFTER = 1000  # acknowledged documents
NO_RETRY = ClientConfig(max_attempts=1, health_check=False)


def retrieval_process(env: dict[str, str], log: Path) -> AbstractAsyncContextManager[Served]:
    """The local retrieval service as a process, its stderr appended to ``log``."""
    argv = ["-m", "services.retrieval", "--port", "0", "--host", "127.0.0.1", "--backend", "local"]
    return served(env, *argv, stderr=log)


def batch(writer: int, number: int, rng: np.random.Generator) -> list[common_pb2.Document]:
    vectors = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    return [
        common_pb2.Document(id=f"w{writer}-b{number}-{i}", text=f"batch {number}", embedding=v)
        for i, v in enumerate(vectors.tolist())
    ]


async def test_acknowledged_upserts_survive_sigkill(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **subprocess_env,
        "OPEA_RETRIEVAL_DATA_DIR": str(tmp_path / "index"),
        "OPEA_RETRIEVAL_ANN_THRESHOLD": "300",
        "OPEA_RETRIEVAL_MAX_TOP_K": "10000",
    }
    log = tmp_path / "stderr.log"
    acked: set[str] = set()
    batches: list[set[str]] = []

    async with retrieval_process(env, log) as proc:
        channel = connect(proc.target, [RetrievalClient.SERVICE], NO_RETRY)
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        killed = asyncio.Event()

        async def write(writer: int) -> None:
            rng = np.random.default_rng(writer)
            number = 0
            while not killed.is_set():
                docs = batch(writer, number, rng)
                batches.append({d.id for d in docs})
                request = retrieval_pb2.UpsertRequest(collection="k", documents=docs)
                try:
                    reply = await stub.Upsert(request, timeout=30)
                except grpc.aio.AioRpcError:
                    assert killed.is_set(), "an upsert failed before the kill"
                    return
                assert reply.upserted_count == BATCH
                acked.update(d.id for d in docs)
                if len(acked) >= KILL_AFTER and not killed.is_set():
                    os.kill(proc.pid, signal.SIGKILL)  # right after this acknowledgement
                    killed.set()
                number += 1

        await asyncio.gather(*(write(w) for w in range(WRITERS)))
        assert await proc.proc.wait() == -signal.SIGKILL
        await channel.close(None)

    async with retrieval_process(env, log) as proc:
        channel = connect(proc.target, [RetrievalClient.SERVICE], NO_RETRY)
        client = RetrievalClient(channel)
        listed = {c.name: c.document_count for c in (await client.list_collections()).collections}
        reply = await client.search(
            retrieval_pb2.SearchRequest(collection="k", vector=[1.0] * DIM, top_k=10000)
        )
        present = {d.document.id for d in reply.documents}
        assert listed == {"k": len(present)}
        assert acked <= present, f"{len(acked - present)} acknowledged documents were lost"
        for ids in batches:  # a batch in flight at the kill: all of it or none of it
            assert ids <= present or not ids & present
        assert {d.document.text for d in reply.documents} <= {
            f"batch {n}" for n in range(len(batches))
        }

        code, out, _ = await health(subprocess_env, proc.target, RetrievalClient.SERVICE)
        assert code == 0, out
        assert "SERVING" in out
        await channel.close(None)

        assert await proc.stop() == 0
    assert "Traceback" not in log.read_text()
