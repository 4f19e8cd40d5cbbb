"""The Dockerfile builds one small image for every process, from a context that has what the
build needs and nothing else; its runtime stage runs as an unprivileged user.

(Docker is not needed: the Dockerfile and ``.dockerignore`` are read in Python, see
:mod:`tests.deploy.dockerfile`; ``test_compose_run`` runs the image's files.)
"""

from __future__ import annotations

import shlex
import subprocess

import pytest

from tests.deploy.compose import COMPOSE_FILE, Project
from tests.deploy.dockerfile import ROOT, context_files, expand, ignore_patterns, ignored, parse

DOCKERFILE = ROOT / "Dockerfile"
PACKAGES = ("opea_grpc", "services", "gateway")


def tracked(*paths: str) -> list[str]:
    done = subprocess.run(
        ["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_dockerignore_rules_read_as_buildkit_reads_them() -> None:
    patterns = ignore_patterns(ROOT / ".dockerignore")
    assert not ignored("opea_grpc/cli.py", patterns)
    assert not ignored("services/embedding/minilm-requirements.txt", patterns)
    assert ignored("services/embedding/__pycache__/bert.cpython-311.pyc", patterns)
    assert ignored("tests/conftest.py", patterns)
    assert ignored("node_modules/.bin/buf", patterns)
    assert ignored(".git/HEAD", patterns)


def test_the_context_holds_the_packages_and_nothing_else() -> None:
    files = context_files(ROOT)
    missing = [
        f for f in tracked(*PACKAGES, "pyproject.toml", "README.md") if f not in files
    ]  # fmt: skip
    assert missing == []
    strays = {f for f in files if f.split("/")[0] not in PACKAGES}
    assert strays == {"pyproject.toml", "README.md"}
    assert not [f for f in files if f.endswith((".pyc", ".pyo"))]


def test_every_copy_finds_its_sources_in_the_context() -> None:
    files = context_files(ROOT)
    for stage in parse(DOCKERFILE):
        for text in stage.of("COPY"):
            words = shlex.split(text)
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                found = [f for f in files if f == source or f.startswith(source.rstrip("/") + "/")]
                assert found, f"COPY {source}: not in the build context"


def test_two_stages_and_an_unprivileged_runtime() -> None:
    build, runtime = parse(DOCKERFILE)
    assert build.base == runtime.base
    assert build.base.startswith("python:3.11-slim")
    # The runtime stage takes the virtualenv from the build stage, and installs nothing.
    assert runtime.of("COPY") == ["--from=build /opt/venv /opt/venv"]
    assert not any("pip " in text for text in runtime.of("RUN"))
    (user,) = runtime.of("USER")
    uid, _, gid = expand(user, runtime.args()).partition(":")
    # Numeric, so that Kubernetes can check runAsNonRoot; not root.
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    env = runtime.env({"PATH": "/usr/bin"})
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert env["OPEA_HOST"] == "0.0.0.0"
    assert shlex.split(runtime.of("CMD")[-1].strip("[]").replace(",", " ")) == [
        "opea-grpc", "serve", "gateway",
    ]  # fmt: skip


def test_the_model_files_are_a_build_argument() -> None:
    build = parse(DOCKERFILE)[0]
    assert build.args()["WITH_MINILM"] == "true"
    minilm = [text for text in build.of("RUN") if "minilm-requirements.txt" in text]
    assert len(minilm) == 1
    assert "--require-hashes" in minilm[0]
    assert "--no-deps" in minilm[0]
    assert '"$WITH_MINILM" = "true"' in minilm[0]
    extras = build.args()["EXTRAS"].split(",")
    assert "pgvector" in extras


@pytest.mark.parametrize("service", ["embedding", "retrieval", "rerank", "chat", "gateway"])
def test_the_image_exposes_what_compose_uses(service: str) -> None:
    runtime = parse(DOCKERFILE)[-1]
    exposed = {int(p) for text in runtime.of("EXPOSE") for p in text.split()}
    env = Project.load(COMPOSE_FILE, {}).environment(service)
    assert int(env["OPEA_PORT"] or 0) in exposed
    if service == "gateway":
        assert int(env["OPEA_GATEWAY_REST_PORT"] or 0) in exposed
