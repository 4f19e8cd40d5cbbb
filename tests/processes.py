"""Run the repository's commands and services as child processes, for tests.

>>> async with served(env, "-m", "services.chat", "--port", "0", "--host", "127.0.0.1") as child:
...     assert (await health(env, child.target, ChatClient.SERVICE)).code == 0
...     ...  # call child.target over gRPC
...     assert await child.stop() == 0  # SIGTERM: a clean shutdown exits 0

``env`` is the ``subprocess_env`` fixture of ``tests/conftest.py`` (or a copy with more settings).
A served child's stderr goes to a file, never to a pipe: a pipe nobody reads fills up and blocks
the child. Its stdout is read only up to the line that says it is ready.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import pytest

#: What ``opea-grpc serve`` and ``python -m services.NAME`` print once they accept calls:
#: ``NAME listening on HOST:PORT``. Group 1 is the target.
LISTENING = re.compile(r"listening on (\S+:\d+)")
#: How much of a failed child's stderr a failure message quotes.
TAIL = 4000


class Result(NamedTuple):
    """How a command ended: its exit code and its decoded output."""

    code: int
    out: str
    err: str


async def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> Result:
    """Run ``python -m opea_grpc ARGS`` to its end (at most ``timeout`` seconds)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "opea_grpc", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await reap(proc)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def health(env: dict[str, str], target: str, service: str = "") -> Result:
    """Probe ``target`` with ``opea-grpc health`` (the server as a whole unless ``service``)."""
    return await run_cli(env, "health", target, *(["--service", service] if service else []))


@dataclass
class Served:
    """A child process that said it is ready, and where it listens."""

    proc: asyncio.subprocess.Process
    #: ``HOST:PORT`` as the child announced it.
    target: str
    #: The stdout line that announced it.
    line: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and return the exit code (negative: the signal that ended it)."""
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)


@asynccontextmanager
async def served(
    env: dict[str, str],
    *argv: str,
    ready: re.Pattern[str] = LISTENING,
    ready_timeout: float = 60,
    stderr: Path | None = None,
) -> AsyncIterator[Served]:
    """Start ``python ARGV`` and yield it once a stdout line matches ``ready`` (group 1: target).

    Fails the test, quoting the end of the child's stderr, if the child exits first or is not
    ready within ``ready_timeout`` seconds. Its stderr is appended to ``stderr`` when given (for a
    test to read after), else to a temporary file. On leaving, a child still running is killed;
    either way it is reaped.
    """
    with open_log(stderr) as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=log, env=env
        )
        try:
            try:
                match = await asyncio.wait_for(announced(proc, ready), ready_timeout)
            except asyncio.TimeoutError:
                match = None
            if match is None:
                if proc.returncode is None:
                    why = f"was not ready after {ready_timeout} s"
                else:
                    why = f"exited with code {proc.returncode}"
                await reap(proc)
                pytest.fail(
                    f"python {' '.join(argv)} {why}: no stdout line matched {ready.pattern!r}; "
                    "its stderr ends:\n" + tail(log)
                )
            yield Served(proc, match[1], match.string.rstrip("\n"))
        finally:
            await reap(proc)


def open_log(path: Path | None) -> IO[bytes]:
    """A file for a child's stderr that is readable here: ``path`` (appended to) or a temp file."""
    return path.open("a+b") if path is not None else tempfile.TemporaryFile()


def tail(log: IO[bytes]) -> str:
    """The end of what was written to ``log``, read without moving its offset."""
    size = os.fstat(log.fileno()).st_size
    start = max(0, size - TAIL)
    return os.pread(log.fileno(), size - start, start).decode(errors="replace")


async def announced(
    proc: asyncio.subprocess.Process, ready: re.Pattern[str]
) -> re.Match[str] | None:
    """The first stdout line of ``proc`` that matches ``ready``; None once the child has exited."""
    assert proc.stdout is not None
    while line := (await proc.stdout.readline()).decode():
        if match := ready.search(line):
            return match
    await proc.wait()
    return None


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if it is still running, and wait for it."""
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
