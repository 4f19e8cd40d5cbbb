"""``opea-grpc ingest``: which files it reads, and what a real gateway makes of them."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest

from gateway import loader
from gateway.service import GatewayService
from gateway.service import Settings as GatewaySettings
from gateway.service import build as build_gateway
from opea_grpc.config import ConfigError, ServerConfig
from opea_grpc.testing import started
from services.chat import service as chat
from services.embedding import service as embedding
from services.rerank import service as rerank
from services.retrieval import service as retrieval
from tests.processes import run_cli

LOOPBACK = ServerConfig(host="127.0.0.1", port=0, grace=0.5)
LATIN1 = "Caf\xe9 cr\xe8me, d\xe9j\xe0 vu.".encode("latin-1")


def corpus(root: Path) -> Path:
    """A folder with markdown, text, reST, an image, a Latin-1 file, an empty and a hidden one."""
    (root / "guide").mkdir(parents=True)
    (root / "guide" / "zorblax.md").write_text(
        "# The zorblax valve\n\nThe zorblax valve opens at dawn and closes at dusk.\n\n"
        "Its spare parts are kept in the blue cabinet.\n"
    )
    (root / "notes.txt").write_text("Quarterly notes: the quokka budget doubled this year.\n")
    (root / "manual.rst").write_text("Manual\n======\n\nPress the red button twice.\n")
    (root / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "legacy.txt").write_bytes(LATIN1)
    (root / "empty.md").write_text("  \n")
    (root / ".hidden.md").write_text("# secret\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.md").write_text("ref\n")
    return root


# -- which files are read (no network) ----------------------------------------------------------


def test_documents_walks_folders_and_reports_what_it_left_out(tmp_path: Path) -> None:
    found = loader.documents([corpus(tmp_path / "docs")])
    assert [d.id for d in found.documents] == ["guide/zorblax.md", "manual.rst", "notes.txt"]
    zorblax, manual, notes = found.documents
    assert zorblax.metadata == {"title": "The zorblax valve", "format": "markdown"}
    assert manual.metadata == {"title": "Manual", "format": "restructuredtext"}
    assert notes.metadata == {"title": "notes", "format": "text"}
    assert zorblax.text.startswith("# The zorblax valve")
    skipped = {Path(p.path).name: p.reason for p in found.skipped}
    assert skipped == {"photo.png": "not a document type (.png)", "empty.md": "empty"}
    [failed] = found.failed
    assert Path(failed.path).name == "legacy.txt"
    assert "not UTF-8 text (byte 0xe9 at offset 3)" in failed.reason
    assert "convert it to UTF-8" in failed.reason


def test_ids_are_stable_and_relative_to_the_path_given(tmp_path: Path) -> None:
    docs = corpus(tmp_path / "docs")
    first = loader.documents([docs, docs / "guide" / "zorblax.md"])
    again = loader.documents([str(docs)])
    assert [d.id for d in first.documents] == [d.id for d in again.documents]
    assert len(first.documents) == 3, "a file reached twice is read once"
    alone = loader.documents([docs / "guide" / "zorblax.md"])
    assert [d.id for d in alone.documents] == ["zorblax.md"]


def test_bom_is_dropped_and_missing_or_clashing_paths_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "readme.md").write_bytes(b"\xef\xbb\xbf# A\n")
    (tmp_path / "b" / "readme.md").write_text("# B\n")
    found = loader.documents([tmp_path / "a", tmp_path / "b", tmp_path / "nope"])
    assert [d.text for d in found.documents] == ["# A\n"]
    clash, missing = found.failed
    assert "its id 'readme.md' is taken by" in clash.reason
    assert missing == loader.Problem(str(tmp_path / "nope"), "no such file or folder")


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    locked = tmp_path / "locked.md"
    locked.write_text("# locked\n")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as a user who can read anything (root)")
        [problem] = loader.documents([tmp_path]).failed
        assert problem.reason == "cannot read it: Permission denied"
    finally:
        locked.chmod(0o644)


def test_batches_hold_at_most_size_documents_and_about_max_bytes() -> None:
    docs = [loader.Document(str(i), "x" * 100, {}) for i in range(5)]
    assert [len(b) for b in loader.batches(docs, 2)] == [2, 2, 1]
    assert [len(b) for b in loader.batches(docs, 10, max_bytes=350)] == [2, 2, 1]
    assert [len(b) for b in loader.batches(docs, 10, max_bytes=10)] == [1] * 5


@pytest.mark.parametrize(
    ("batch", "size", "overlap", "message"),
    [
        (0, None, None, "batch must be at least 1"),
        (1, 0, None, "chunk size must be >= 1"),
        (1, 100, 100, "chunk overlap must be >= 0 and below"),
    ],
)
async def test_bad_settings_are_refused_before_anything_is_read(
    batch: int, size: int | None, overlap: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        await loader.ingest(
            "http://127.0.0.1:9", ["/nonexistent"], batch=batch, chunk_size=size,
            chunk_overlap=overlap, progress=False,
        )  # fmt: skip


# -- against a running gateway -----------------------------------------------------------------


@asynccontextmanager
async def gateway(data: Path) -> AsyncIterator[GatewayService]:
    """The four built-in services (hashing embeddings) and a gateway, on loopback ports."""
    services = {
        "embedding": embedding.build(LOOPBACK, embedding.Settings(backend="hashing")),
        "retrieval": retrieval.build(LOOPBACK, retrieval.Settings(data_dir=str(data))),
        "rerank": rerank.build(LOOPBACK, rerank.Settings()),
        "chat": chat.build(LOOPBACK, chat.Settings()),
    }
    async with AsyncExitStack() as stack:
        for service in services.values():
            await stack.enter_async_context(started(service))
        target = {name: service.target for name, service in services.items()}
        settings = GatewaySettings(
            embedding=target["embedding"], retrieval=target["retrieval"],
            rerank=target["rerank"], chat=target["chat"], rest_port=0,
        )  # fmt: skip
        gw = build_gateway(LOOPBACK, settings)
        await gw.start()
        stack.push_async_callback(gw.stop, 0)
        yield gw


async def test_ingest_then_search_and_ask(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    docs = corpus(tmp_path / "docs")
    async with gateway(tmp_path / "index") as gw:
        url = gw.rest.url
        code, out, err = await run_cli(
            subprocess_env, "ingest", str(docs), "--url", url, "--collection", "manuals"
        )
        assert code == 1, "a file could not be read: the exit code says so"
        assert out.strip() == (
            "ingested 3 documents (3 chunks) into collection 'manuals'; "
            "skipped 2 files of other types or empty; 1 file could not be read"
        )
        assert "warning: left out" in err
        assert "legacy.txt: not UTF-8 text" in err
        assert "chunks=3" in err, "the progress bar counts chunks"
        assert "Traceback" not in err

        async with httpx.AsyncClient(base_url=url) as client:
            found = await client.post(
                "/v1/search", json={"query": "zorblax valve", "collection": "manuals"}
            )
            assert found.status_code == 200, found.text
            top = found.json()["data"][0]
            assert top["id"] == "guide/zorblax.md#0"
            assert top["metadata"]["source"] == "guide/zorblax.md"
            assert top["metadata"]["title"] == "The zorblax valve"

            sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
            completion = await sdk.chat.completions.create(
                model="extractive-answerer",
                messages=[{"role": "user", "content": "When does the zorblax valve open?"}],
                extra_body={"opea": {"collection": "manuals"}},
            )
            answer = completion.choices[0].message.content or ""
            assert "The zorblax valve opens at dawn and closes at dusk. [1]" in answer
            assert completion.model_extra is not None
            sources = completion.model_extra["opea"]["sources"]
            assert sources[0]["metadata"]["source"] == "guide/zorblax.md"

            # Ingesting again replaces the documents (same ids) instead of adding copies.
            (docs / "legacy.txt").unlink()
            code, out, err = await run_cli(
                subprocess_env, "ingest", str(docs), "--url", url, "--collection", "manuals",
                "--quiet", "--chunk-size", "30", "--chunk-overlap", "0",
            )  # fmt: skip
            assert code == 0, err
            assert out.startswith("ingested 3 documents (9 chunks) into collection 'manuals'")
            assert err == ""
            listed = (await client.get("/v1/collections")).json()["data"]
            assert {c["name"]: c["document_count"] for c in listed} == {"manuals": 9}


async def test_gateway_refusal_is_its_message(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    docs = corpus(tmp_path / "docs")
    async with gateway(tmp_path / "index") as gw:
        code, out, err = await run_cli(
            subprocess_env, "ingest", str(docs), "--url", gw.rest.url, "--collection", "c" * 300
        )
    assert code == 1
    assert out == ""
    assert "the gateway refused guide/zorblax.md, manual.rst, notes.txt (HTTP 400)" in err
    assert "256 characters" in err
    assert "Traceback" not in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_gateway_down_is_a_clear_error(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    docs = corpus(tmp_path / "docs")
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run_cli(subprocess_env, "ingest", str(docs), "--url", url, "--quiet")
    assert code == 1
    assert out == ""
    assert f"opea-grpc: error: cannot reach the gateway at {url}/v1/ingest" in err
    assert "is it running?" in err
    assert "Traceback" not in err


async def test_nothing_to_ingest_is_a_clear_error(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    code, _, err = await run_cli(subprocess_env, "ingest", str(tmp_path), "--quiet")
    assert code == 1
    assert "no documents to ingest (looked for .md, .markdown, .txt, .rst files)" in err
    assert "skipped 1 file" in err
    assert "Traceback" not in err


async def test_bad_flags_are_usage_errors(subprocess_env: dict[str, str]) -> None:
    code, _, err = await run_cli(subprocess_env, "ingest", ".", "--chunk-size", "0")
    assert code == 2
    assert "chunk size must be >= 1, got 0" in err
    assert "Traceback" not in err
