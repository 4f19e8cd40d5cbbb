"""Hand-written code is clean under ruff and mypy --strict (generated code is excluded)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

CODE = ["opea_grpc", "services", "gateway", "bench", "tests"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_check() -> None:
    result = run("ruff", "check", *CODE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run("ruff", "format", "--check", *CODE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run("mypy", "opea_grpc", "services", "gateway", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
