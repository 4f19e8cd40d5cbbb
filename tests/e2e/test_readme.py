"""The README tells the truth: its example is the code that runs, its commands are CI's."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_are_the_demo_code() -> None:
    demo = (ROOT / "opea_grpc" / "demo.py").read_text()
    examples = blocks("python")
    microservice, pipeline = examples[0], examples[1]
    assert "class OverlapReranker" in microservice
    assert "ServiceOrchestrator" in pipeline
    for example in (microservice, pipeline):
        assert example in demo, "README example and opea_grpc/demo.py have drifted apart"
    service_lines = microservice.split("\n\n\ndef build")[0].strip().splitlines()
    assert len(service_lines) <= 22


def test_ci_runs_the_readme_test_command() -> None:
    commands = [line for block in blocks("sh") for line in block.splitlines()]
    test_command = next(c for c in commands if c.endswith("&& pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert any(c.endswith("&& opea-grpc demo") for c in commands)


async def test_demo_runs_the_pipeline_once(subprocess_env: dict[str, str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "opea_grpc", "demo", "--once",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert (
        "A: Server reflection lets grpcurl discover services and methods at run time. [1]" in text
    )
    for node in ("retrieve", "rerank", "answer"):
        assert re.search(rf"^\s+{node}\s+OK\s+[\d.]+ ms$", text, flags=re.M), text
    assert "flowchart LR" in text


async def test_demo_serves_until_interrupted(subprocess_env: dict[str, str], buf: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "opea_grpc", "demo", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=subprocess_env,
    )  # fmt: skip
    assert proc.stdout is not None

    async def read_target(stdout: asyncio.StreamReader) -> str:
        while True:
            line = (await stdout.readline()).decode()
            assert line, "demo exited before serving"
            if match := re.match(r"overlap-rerank serving on (\S+);", line):
                return match.group(1)

    try:
        target = await asyncio.wait_for(read_target(proc.stdout), 60)
        call = await asyncio.create_subprocess_exec(
            buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge",
            "-d", '{"query": "grpc", "documents": [{"text": "bananas"}, {"text": "grpc here"}]}',
            f"http://{target}/opea.v1.RerankService/Rerank",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(call.communicate(), 60)
        assert call.returncode == 0, err.decode()
        assert '"text": "grpc here"' in out.decode()
        assert (
            out.decode().index("grpc here") < out.decode().find("bananas")
            or "bananas" not in out.decode()
        )
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_every_service_setting_is_documented() -> None:
    import dataclasses
    import importlib

    from opea_grpc.cli import BUILTIN_SERVICES
    from opea_grpc.config import ServerConfig

    missing = [
        f"OPEA_{field.name.upper()}"
        for field in dataclasses.fields(ServerConfig)
        if f"OPEA_{field.name.upper()}" not in README
    ]
    for name, module_name in BUILTIN_SERVICES.items():
        settings = importlib.import_module(module_name).Settings
        missing += [
            f"OPEA_{name.upper()}_{field.name.upper()}"
            for field in dataclasses.fields(settings)
            if f"OPEA_{name.upper()}_{field.name.upper()}" not in README
        ]
    assert missing == [], f"README lacks: {missing}"
