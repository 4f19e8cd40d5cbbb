"""The README tells the truth: its example is the code that runs, its commands are CI's."""

from __future__ import annotations

import asyncio
import re
import signal

from tests.conftest import ROOT
from tests.processes import run_cli, served

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
    assert any(c.endswith("&& opea-grpc up") for c in commands)


async def test_demo_runs_the_pipeline_once(subprocess_env: dict[str, str]) -> None:
    code, text, err = await run_cli(subprocess_env, "demo", "--once")
    assert code == 0, err
    assert (
        "A: Server reflection lets grpcurl discover services and methods at run time. [1]" in text
    )
    for node in ("retrieve", "rerank", "answer"):
        assert re.search(rf"^\s+{node}\s+OK\s+[\d.]+ ms$", text, flags=re.M), text
    assert "flowchart LR" in text


async def test_demo_serves_until_interrupted(subprocess_env: dict[str, str], buf: str) -> None:
    serving = re.compile(r"^overlap-rerank serving on (\S+);")
    async with served(
        subprocess_env, "-m", "opea_grpc", "demo", "--port", "0", ready=serving
    ) as demo:
        call = await asyncio.create_subprocess_exec(
            buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge",
            "-d", '{"query": "grpc", "documents": [{"text": "bananas"}, {"text": "grpc here"}]}',
            f"http://{demo.target}/opea.v1.RerankService/Rerank",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(call.communicate(), 60)
        assert call.returncode == 0, err.decode()
        assert '"text": "grpc here"' in out.decode()
        assert (
            out.decode().index("grpc here") < out.decode().find("bananas")
            or "bananas" not in out.decode()
        )
        assert await demo.stop(signal.SIGINT) == 0


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
