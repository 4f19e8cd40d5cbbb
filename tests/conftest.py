from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from opea_grpc import entry  # imports no grpc

# One BLAS thread per process: the suite shares two cores with the services it starts, and
# OpenBLAS threads that wait on each other there run several times slower than one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# gRPC in this process as the command runs it (settled before any test module imports grpc).
entry.prepare()

ROOT = Path(__file__).resolve().parent.parent


def find_buf() -> str:
    local = ROOT / "node_modules" / ".bin" / "buf"
    found = str(local) if local.exists() else shutil.which("buf")
    if found is None:
        pytest.fail(
            "buf not found: run `npm ci` in the repository (package.json pins @bufbuild/buf)"
        )
    return found


@pytest.fixture(scope="session")
def buf() -> str:
    return find_buf()


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for child processes that import the repository's packages and tests."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env
