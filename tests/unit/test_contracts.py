"""The contracts: lint-clean, and the generated code matches protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from opea_grpc.codegen import generate
from tests.conftest import ROOT


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "pb"
    generate(out)
    checked_in = ROOT / "opea_grpc" / "pb"
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    current = {
        p.relative_to(checked_in): p.read_bytes()
        for p in checked_in.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    stale = sorted(str(k) for k in fresh.keys() | current.keys() if fresh.get(k) != current.get(k))
    assert not stale, f"generated code is stale, run `python -m opea_grpc.codegen`: {stale}"


def test_buf_lint_standard(buf: str) -> None:
    result = subprocess.run(
        [buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STANDARD" in (ROOT / "protos" / "buf.yaml").read_text()


def test_generated_package_imports_without_path_tricks() -> None:
    code = "import opea_grpc.pb.v1.chatqna_pb2_grpc as m; print(m.ChatQnAServiceStub.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ChatQnAServiceStub"
