"""``schemathesis run --checks all`` against the running gateway's /openapi.json finds nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import Stack
from tests.gateway.test_openai_sdk import ingest

#: Examples per operation: enough to cover every route's edges, bounded for CI.
EXAMPLES = 25


def schemathesis() -> str:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return found


@pytest.mark.slow
async def test_schemathesis_finds_nothing(stack: Stack, tmp_path: Path) -> None:
    await ingest(stack)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        assert (await http.get("/readyz")).status_code == 200
    report = tmp_path / "schemathesis.txt"
    with report.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            schemathesis(),
            "run",
            "--checks",
            "all",
            "--max-examples",
            str(EXAMPLES),
            "--seed",
            "1",
            f"{stack.url}/openapi.json",
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"},
            cwd=tmp_path,
        )
        code = await asyncio.wait_for(proc.wait(), 600)
    text = report.read_text(errors="replace")
    summary = text[text.find("SUMMARY") :] if "SUMMARY" in text else text[-3000:]
    assert code == 0, f"schemathesis found problems:\n{text[:6000]}\n...\n{summary}"
    assert " passed" in summary
