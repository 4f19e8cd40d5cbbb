"""``opea-grpc up``: it starts everything, answers from the sample corpus, stops without a trace."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from gateway import launcher
from opea_grpc.config import ConfigError
from tests.processes import open_log, reap, tail

#: Seconds ``up`` may take to print its banner (the minilm model loads, the corpus is embedded);
#: ``up`` itself gives up sooner, and says what it was waiting for.
READY_TIMEOUT = 120
UP_TIMEOUT = "90"
SAMPLE = {p.name for p in launcher.sample_corpus()}


@dataclass
class Up:
    """A running ``opea-grpc up``: the process, the banner it printed, its children."""

    proc: asyncio.subprocess.Process
    banner: str
    children: list[psutil.Process]

    def after(self, label: str) -> str:
        """The banner's value on the line that starts with ``label``."""
        match = re.search(rf"^\s*{re.escape(label)}\s+(\S+)$", self.banner, flags=re.M)
        assert match, f"no {label!r} line in:\n{self.banner}"
        return match[1]

    def block(self, heading: str) -> str:
        """The indented lines printed under ``heading``, dedented."""
        lines = self.banner.split(heading + "\n", 1)[1].split("\n\n", 1)[0]
        return textwrap.dedent(lines)


def marked(marker: str) -> list[psutil.Process]:
    """Every process whose environment carries ``OPEA_TEST_MARKER=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("OPEA_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def kill_all(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


@asynccontextmanager
async def running_up(env: dict[str, str], *args: str) -> AsyncIterator[Up]:
    """Start ``opea-grpc up ARGS`` and yield it once it printed its banner.

    Whatever happens, on leaving no process it started is left running.
    """
    marker = uuid.uuid4().hex
    env = {**env, "OPEA_TEST_MARKER": marker}
    with open_log(None) as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "opea_grpc", "up", "--timeout", UP_TIMEOUT, *args,
            stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
        )  # fmt: skip
        try:
            banner = await asyncio.wait_for(read_banner(proc), READY_TIMEOUT)
            if banner is None:
                pytest.fail(f"up exited with {proc.returncode}; its stderr ends:\n{tail(log)}")
            children = psutil.Process(proc.pid).children(recursive=True)
            yield Up(proc, banner, children)
        except asyncio.TimeoutError:
            pytest.fail(f"up printed no banner in {READY_TIMEOUT} s; stderr ends:\n{tail(log)}")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), 60)
                except asyncio.TimeoutError:
                    await reap(proc)
            kill_all(marked(marker))


async def read_banner(proc: asyncio.subprocess.Process) -> str | None:
    assert proc.stdout is not None
    lines = []
    while line := (await proc.stdout.readline()).decode():
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            return "".join(lines)
    await proc.wait()
    return None


def ask(rest: str, question: str) -> tuple[str, list[dict[str, object]]]:
    """The answer and its sources, through the official SDK, with the listed chat model."""
    client = OpenAI(base_url=f"{rest}/v1", api_key="unused")
    model = next(m.id for m in client.models.list() if m.id.startswith("extractive"))
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}]
    )
    assert completion.model_extra is not None
    return completion.choices[0].message.content or "", completion.model_extra["opea"]["sources"]


async def run(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_up_answers_from_the_sample_and_stops_cleanly(
    subprocess_env: dict[str, str], tmp_path: Path, buf: str
) -> None:
    async with running_up(subprocess_env, "--free-ports", "--data-dir", str(tmp_path)) as up:
        names = sorted(" ".join(p.cmdline()[3:5]) for p in up.children)
        assert names == [f"serve {n}" for n in sorted(["gateway", *launcher.SERVICES])]
        assert "ingested 7 documents" in up.banner
        rest = up.after("REST (OpenAI-compatible)").removesuffix("/v1")

        answer, sources = await asyncio.to_thread(ask, rest, launcher.SAMPLE_QUESTION)
        assert "[1]" in answer, answer
        cited = {str(s["metadata"]["source"]) for s in sources}  # type: ignore[index]
        assert cited, sources
        assert cited <= SAMPLE, cited

        # The examples printed work as printed.
        curl = up.block("Ask with curl:").replace("\\\n", " ")
        code, out, err = await run(*shlex.split(curl))
        assert code == 0, err
        assert "[1]" in json.loads(out)["choices"][0]["message"]["content"]

        code, out, err = await run(
            sys.executable, "-c", up.block("Ask with the openai SDK (Python):")
        )
        assert code == 0, err
        assert "[1]" in out

        grpcurl = shlex.split(up.block("Ask over gRPC:").replace("\\\n", " "))
        body, target, method = grpcurl[grpcurl.index("-d") + 1], grpcurl[-2], grpcurl[-1]
        code, out, err = await run(
            buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", body,
            f"http://{target}/{method}",
        )  # fmt: skip
        assert code == 0, err
        reply = json.loads(out)
        assert "[1]" in reply["chat"]["message"]["content"]
        assert {s["document"]["metadata"]["source"] for s in reply["sources"]} <= SAMPLE

        up.proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(up.proc.wait(), 60) == 0
        survivors = [p.pid for p in up.children if p.is_running()]
        assert survivors == [], "every child process is gone"


async def test_a_service_that_dies_later_stops_everything(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**subprocess_env, "OPEA_EMBEDDING_BACKEND": "hashing"}
    async with running_up(env, "--free-ports", "--data-dir", str(tmp_path)) as up:
        [chat] = [p for p in up.children if p.cmdline()[3:5] == ["serve", "chat"]]
        chat.kill()
        assert await asyncio.wait_for(up.proc.wait(), 60) == 1
        assert [p.pid for p in up.children if p.is_running()] == []


async def test_a_service_that_fails_stops_everything(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**subprocess_env, "OPEA_RETRIEVAL_BACKEND": "nope"}
    marker = uuid.uuid4().hex
    env["OPEA_TEST_MARKER"] = marker
    with tempfile.TemporaryFile() as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "opea_grpc", "up", "--free-ports", "--data-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            await reap(proc)
        err = tail(log)
    assert proc.returncode == 1
    assert out == b""
    assert "opea-grpc up: retrieval exited with code 2; its last lines:" in err
    assert "OPEA_RETRIEVAL_BACKEND: unknown backend 'nope'" in err
    assert "Traceback" not in err.split("its last lines:")[0]
    leftovers = marked(marker)
    kill_all(leftovers)
    assert leftovers == [], "no child outlives up"


async def test_a_taken_port_is_named_before_anything_starts(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "opea_grpc", "up", "--rest-port", str(port),
            "--data-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    message = err.decode()
    assert f"gateway REST cannot listen on 127.0.0.1:{port}" in message
    assert "--free-ports" in message
    assert "Traceback" not in message
    assert out == b""


async def test_not_ready_in_time_names_what_it_waited_for(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "opea_grpc", "up", "--free-ports", "--data-dir", str(tmp_path),
        "--timeout", "0.01",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    message = err.decode()
    assert "opea-grpc up: not ready after 0.01 s" in message
    assert "is not ready (waiting for its port)" in message
    assert "Traceback" not in message


async def gone(proc: psutil.Process, timeout: float = 10) -> bool:
    """Whether ``proc`` ends (or is left a zombie) within ``timeout`` seconds: a signal it was
    sent is delivered asynchronously."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await asyncio.sleep(0.05)
    return False


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
grandchild = subprocess.Popen([sys.executable, "-c", code])
print(f"grandchild {grandchild.pid}", flush=True)
time.sleep(120)
"""


async def test_stop_kills_a_child_that_ignores_sigterm_and_what_it_started() -> None:
    relayed = io.StringIO()
    child = launcher.Child("stubborn", [sys.executable, "-c", STUBBORN], os.environ, relayed)
    pattern = re.compile(r"^grandchild (\d+)$")
    await child.start(pattern)
    try:
        grandchild = psutil.Process(await asyncio.wait_for(child.port(pattern), 30))
    finally:
        await child.stop(timeout=0.2)
    assert child.proc is not None
    assert child.proc.returncode == -signal.SIGKILL
    assert await gone(grandchild), "the child's process group was killed with it"
    assert relayed.getvalue().startswith(" stubborn | grandchild ")


# -- pure parts -----------------------------------------------------------------------------------


def test_data_dir_flag_then_env_then_per_user_default() -> None:
    home = {"HOME": "/home/ada"}
    assert launcher.data_dir("/srv/opea", home) == Path("/srv/opea/retrieval")
    assert launcher.data_dir(None, {**home, "OPEA_RETRIEVAL_DATA_DIR": "/idx"}) == Path("/idx")
    assert launcher.data_dir(None, {**home, "XDG_DATA_HOME": "/xdg"}) == Path(
        "/xdg/opea-grpc/retrieval"
    )
    assert launcher.data_dir(None, {**home, "XDG_DATA_HOME": "relative"}) == Path(
        "/home/ada/.local/share/opea-grpc/retrieval"
    )


def test_ports_follow_the_base_port_unless_free() -> None:
    options = launcher.Options(data_dir=Path("x"), base_port=7000)
    assert [options.port(n) for n in ("gateway", *launcher.SERVICES)] == [
        7000, 7001, 7002, 7003, 7004,
    ]  # fmt: skip
    free = launcher.Options(data_dir=Path("x"), free_ports=True)
    assert {free.port(n) for n in ("gateway", *launcher.SERVICES)} == {0}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rest_port": 0}, "--rest-port: 0 is not a port"),
        ({"base_port": 65533}, "--base-port: 65533 leaves no room"),
        ({"ready_timeout": 0}, "--timeout must be positive"),
    ],
)
def test_bad_options_say_what_to_fix(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        launcher.Options(data_dir=Path("x"), **settings)  # type: ignore[arg-type]


def test_the_sample_corpus_ships_with_the_package() -> None:
    corpus = launcher.sample_corpus()
    assert 5 <= len(corpus) <= 8
    for path in corpus:
        assert 1024 <= path.stat().st_size <= 4096, path
        assert path.read_text().startswith("# ")
    assert os.path.basename(corpus[0].parent) == "sample"
