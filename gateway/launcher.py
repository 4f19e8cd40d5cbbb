"""``opea-grpc up``: the four services and the gateway on one machine, ready to be asked.

>>> stop = asyncio.Event()                   # the entrypoint sets it on SIGINT / SIGTERM
>>> code = await up(Options(data_dir=Path("/tmp/opea/retrieval")), os.environ, stop)

Starts embedding, retrieval, rerank and chat (``opea-grpc serve NAME``, each a child process in
a process group of its own), waits until each reports SERVING on its gRPC health check, starts
the gateway pointed at them and waits until it reports SERVING and ``/readyz`` answers 200, all
within ``ready_timeout``; ingests the sample corpus (or the given documents); prints where to
send requests with examples to copy; and waits for ``stop``. Then it stops the gateway first and
the services after it: SIGTERM to each process group, SIGKILL to what is left after
``stop_timeout``. A child that exits on its own stops everything, and its last lines are printed.

Every child's output (stdout and stderr) is relayed line by line, prefixed with its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TextIO, TypeVar

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import loader
from opea_grpc.client import ModelClient
from opea_grpc.config import ConfigError
from opea_grpc.pb.v1 import common_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The services, in the order their ports follow the gateway's (``--base-port`` + 1 ...).
SERVICES = ("embedding", "retrieval", "rerank", "chat")
#: Lines of a child's output kept to show when it fails.
TAIL_LINES = 25
SAMPLE_QUESTION = "How do I check that a service is healthy?"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class LaunchError(Exception):
    """Start-up failed; the message says what happened and what to do."""


class _Stopped(Exception):
    """The stop event was set."""


class _Silent(Exception):
    """A child's output ended before it announced what was awaited."""


@dataclass(frozen=True, slots=True)
class Options:
    """What ``opea-grpc up`` starts, and where."""

    #: The retrieval service's index directory (``OPEA_RETRIEVAL_DATA_DIR``).
    data_dir: Path
    #: Files and folders to ingest; none: the sample corpus.
    docs: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    rest_port: int = 8888
    #: The gateway's gRPC port; embedding, retrieval, rerank and chat take the next four.
    base_port: int = 50050
    #: Every port picked by the system instead.
    free_ports: bool = False
    #: Collection to ingest into; None: the gateway's default.
    collection: str | None = None
    ready_timeout: float = 180.0
    stop_timeout: float = 15.0
    #: The gateway reaches the services over Unix sockets (each service also keeps its TCP
    #: port): same machine, less CPU per call. Not with TLS, which names hosts.
    unix_sockets: bool = True

    def __post_init__(self) -> None:
        if not self.free_ports:
            if not 1 <= self.rest_port <= 65535:
                raise ConfigError(f"--rest-port: {self.rest_port} is not a port (1-65535)")
            if not 1 <= self.base_port <= 65535 - len(SERVICES):
                raise ConfigError(
                    f"--base-port: {self.base_port} leaves no room for the {len(SERVICES)} "
                    f"ports after it (1-{65535 - len(SERVICES)})"
                )
        if self.ready_timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.ready_timeout:g}")
        if self.stop_timeout <= 0:
            raise ConfigError(f"the stop timeout must be positive, got {self.stop_timeout:g}")

    def port(self, name: str) -> int:
        """The port ``name`` (``gateway`` or a service) is asked to bind; 0: any free one."""
        if self.free_ports:
            return 0
        return self.base_port + (0 if name == "gateway" else 1 + SERVICES.index(name))


def data_dir(given: str | None, env: Mapping[str, str]) -> Path:
    """The index directory: ``given/retrieval``, else ``OPEA_RETRIEVAL_DATA_DIR``, else the
    per-user data directory's ``opea-grpc/retrieval`` (``$XDG_DATA_HOME``, else
    ``~/.local/share``)."""
    if given:
        return Path(given).expanduser() / "retrieval"
    if env.get("OPEA_RETRIEVAL_DATA_DIR"):
        return Path(env["OPEA_RETRIEVAL_DATA_DIR"]).expanduser()
    xdg = env.get("XDG_DATA_HOME", "")
    base = (
        Path(xdg) if os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".local/share"
    )
    return base / "opea-grpc" / "retrieval"


def sample_corpus() -> list[Path]:
    """The sample documents shipped in ``gateway/sample`` (its README left out)."""
    folder = Path(str(resources.files("gateway").joinpath("sample")))
    found = sorted(p for p in folder.glob("*.md") if p.name != "README.md")
    if not found:
        raise LaunchError(f"the sample corpus is missing from {folder}: reinstall opea-grpc")
    return found


def _client_host(host: str) -> str:
    """Where to connect to a server bound to ``host`` (a wildcard: the loopback address)."""
    return _WILDCARDS.get(host, host)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_ports(host: str, ports: Mapping[str, int]) -> None:
    """Raise LaunchError naming the first of ``ports`` (label -> port) that cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for label, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise LaunchError(
                    f"{label} cannot listen on {_address(host, port)}: {exc.strerror} (another "
                    "program, or an earlier `opea-grpc up`, may hold it); stop it, or choose "
                    "other ports with --rest-port / --base-port, or --free-ports"
                ) from None


class Child:
    """One child process: started, its output relayed and kept, stopped by process group."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], relay: TextIO
    ) -> None:
        self.name = name
        self._argv, self._env, self._relay = list(argv), dict(env), relay
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.proc: asyncio.subprocess.Process | None = None
        self._announced: dict[re.Pattern[str], asyncio.Future[int]] = {}
        self._pump: asyncio.Task[None] | None = None

    async def start(self, *announcements: re.Pattern[str]) -> None:
        """Start the process; each pattern's group 1 (a port) is awaited with :meth:`port`."""
        loop = asyncio.get_running_loop()
        self._announced = {pattern: loop.create_future() for pattern in announcements}
        self.proc = await asyncio.create_subprocess_exec(
            *self._argv, env=self._env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, limit=1 << 20,
        )  # fmt: skip
        self._pump = asyncio.create_task(self._relay_output(), name=f"{self.name} output")

    async def _relay_output(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except ValueError:  # a line longer than the limit: dropped
                continue
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            print(f"{self.name:>9} | {line}", file=self._relay, flush=True)
            for pattern, future in self._announced.items():
                if not future.done() and (match := pattern.search(line)):
                    future.set_result(int(match[1]))
        for future in self._announced.values():
            if not future.done():
                future.set_exception(_Silent())
                future.exception()  # marked as retrieved: nobody may be waiting for it

    async def port(self, pattern: re.Pattern[str]) -> int:
        """The port the child announced on a line matching ``pattern``."""
        try:
            return await asyncio.shield(self._announced[pattern])
        except _Silent:
            assert self.proc is not None
            try:  # its output ended: it is exiting
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except asyncio.TimeoutError:
                raise LaunchError(
                    f"{self.name} closed its output before it was listening; its last lines:\n"
                    + self.last_lines()
                ) from None
            raise LaunchError(self.exited()) from None

    def exited(self) -> str:
        """Why the child is gone: its exit code and last lines."""
        code = self.proc.returncode if self.proc is not None else None
        return f"{self.name} exited with code {code}; its last lines:\n{self.last_lines()}"

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group: whatever the child started goes too

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is reaped."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%s did not stop within %g s: killing it", self.name, timeout)
                self._signal(signal.SIGKILL)
                await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
            self._pump.cancel()

    def last_lines(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"


def _announcement(name: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(name)} listening on \S*:(\d+)\s*$")


_REST = re.compile(r"^gateway REST listening on http://\S*:(\d+)\s*$")


class _Launch:
    """One run of ``up``: its children, and the events that end a wait early."""

    def __init__(
        self, options: Options, env: Mapping[str, str], stop: asyncio.Event, relay: TextIO
    ) -> None:
        self.options, self.stop, self.relay = options, stop, relay
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.host = _client_host(options.host)
        self.children: dict[str, Child] = {}
        #: Children that exited while they should have been running, and an event for the first.
        self.dead: list[Child] = []
        self.death = asyncio.Event()
        #: What start-up still waits for: name -> what.
        self.waiting: dict[str, str] = {}
        #: The folder of the services' Unix sockets, if they have some.
        self.run_dir: str | None = None
        self._watchers: list[asyncio.Task[None]] = []

    async def spawn(self, name: str, env: Mapping[str, str], *patterns: re.Pattern[str]) -> Child:
        argv = [sys.executable, "-m", "opea_grpc", "serve", name]
        argv += ["--host", self.options.host, "--port", str(self.options.port(name))]
        child = self.children[name] = Child(name, argv, env, self.relay)
        self.waiting[name] = "its port"
        await child.start(*patterns)
        self._watchers.append(asyncio.create_task(self._watch(child)))
        return child

    async def _watch(self, child: Child) -> None:
        await child.wait()
        self.dead.append(child)
        self.death.set()

    async def until(self, work: Awaitable[T], timeout: float | None = None) -> T:
        """``work``'s result, unless stop is set (_Stopped), a child exits or time runs out."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        died = asyncio.ensure_future(self.death.wait())
        try:
            await asyncio.wait(
                {task, stopped, died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in (task, stopped, died):
                waiter.cancel()
            await asyncio.gather(task, stopped, died, return_exceptions=True)
        if self.dead:
            raise LaunchError(self.dead[0].exited())
        if task.done() and not task.cancelled():
            return task.result()
        if self.stop.is_set():
            raise _Stopped
        late = "\n".join(
            f"{name} is not ready (waiting for {what}); its last lines:\n"
            + self.children[name].last_lines()
            for name, what in self.waiting.items()
        )
        raise LaunchError(
            f"not ready after {timeout:g} s (a longer --timeout gives it more time)\n{late}"
        )

    def sockets(self) -> dict[str, str]:
        """Each service's Unix socket, in a fresh private folder (none: TCP only)."""
        if not self.options.unix_sockets or self.env.get("OPEA_TLS_CERT"):
            return {}
        self.run_dir = tempfile.mkdtemp(prefix="opea-grpc-")
        return {name: os.path.join(self.run_dir, f"{name}.sock") for name in SERVICES}

    async def start(self) -> dict[str, int]:
        """Start everything; the port of each process (and ``rest``) once all are ready."""
        services = {name: _announcement(name) for name in SERVICES}
        env = {**self.env, "OPEA_RETRIEVAL_DATA_DIR": str(self.options.data_dir)}
        sockets = self.sockets()
        for name, pattern in services.items():
            own = {**env, "OPEA_UNIX_SOCKET": sockets[name]} if sockets else env
            await self.spawn(name, own, pattern)
        ready = [
            asyncio.ensure_future(self._ready(self.children[n], p)) for n, p in services.items()
        ]
        try:
            ports = dict(zip(SERVICES, await asyncio.gather(*ready), strict=True))
        finally:  # one failed, or start-up is abandoned: stop waiting for the others
            for waiting in ready:
                waiting.cancel()
            await asyncio.gather(*ready, return_exceptions=True)
        gateway_env = {**self.env, "OPEA_GATEWAY_REST_PORT": str(self._rest_port())}
        for name in SERVICES:
            target = f"unix:{sockets[name]}" if sockets else _address(self.host, ports[name])
            gateway_env[f"OPEA_GATEWAY_{name.upper()}"] = target
        pattern = _announcement("gateway")
        gateway = await self.spawn("gateway", gateway_env, pattern, _REST)
        ports["gateway"] = await self._ready(gateway, pattern)
        ports["rest"] = await gateway.port(_REST)
        self.waiting["gateway"] = "/readyz to answer 200"
        await _ready_http(f"http://{_address(self.host, ports['rest'])}/readyz")
        del self.waiting["gateway"]
        return ports

    def _rest_port(self) -> int:
        return 0 if self.options.free_ports else self.options.rest_port

    async def _ready(self, child: Child, pattern: re.Pattern[str]) -> int:
        port = await child.port(pattern)
        self.waiting[child.name] = "its health check to report SERVING"
        await _serving(_address(self.host, port))
        del self.waiting[child.name]
        log.info("%s is SERVING on %s", child.name, _address(self.host, port))
        return port

    async def stop_all(self) -> None:
        """The gateway first, then the services, each group SIGTERM then SIGKILL."""
        timeout = self.options.stop_timeout
        if "gateway" in self.children:
            await self.children["gateway"].stop(timeout)
        await asyncio.gather(*(c.stop(timeout) for n, c in self.children.items() if n != "gateway"))
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


async def _serving(target: str) -> None:
    """Return once the server at ``target`` reports SERVING (health Watch, no polling)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            try:
                async for reply in stub.Watch(request, wait_for_ready=True):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise LaunchError(
                        f"{target} health: {exc.code().name}: {exc.details()}"
                    ) from None


async def _ready_http(url: str) -> None:
    """Return once ``url`` answers 200; polled, as HTTP has nothing to wait on."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)


async def _chat_model(target: str) -> str:
    """The id of the model the chat service serves."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await ModelClient(channel).list_models(timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            raise LaunchError(
                f"chat at {target} does not list its models: {exc.code().name}: {exc.details()}"
            ) from None
    chats = [m.id for m in reply.models if m.kind == common_pb2.MODEL_KIND_CHAT]
    return chats[0] if chats else "extractive-answerer"


def banner(
    ports: Mapping[str, int], host: str, model: str, question: str, summary: loader.Summary,
    data_dir: Path,
) -> str:  # fmt: skip
    """What ``up`` prints once ready: addresses and examples to copy."""
    rest = f"http://{_address(host, ports['rest'])}"
    grpc_target = _address(host, ports["gateway"])
    services = ", ".join(f"{n} {_address(host, ports[n])}" for n in SERVICES)
    message = {"role": "user", "content": question}
    body = {"model": model, "messages": [message]}
    ask = {"chat": {"model": model, "messages": [{"role": "ROLE_USER", "content": question}]}}
    return "\n".join(
        [
            f"opea-grpc is up: {summary.report()}",
            "",
            f"  REST (OpenAI-compatible)  {rest}/v1",
            f"  gRPC (ChatQnAService)     {grpc_target}",
            f"  services                  {services}",
            f"  retrieval index           {data_dir}",
            "",
            "Ask with curl:",
            f"  curl -s {rest}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"    -d {shlex.quote(json.dumps(body))}",
            "",
            "Ask with the openai SDK (Python):",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{rest}/v1", api_key="unused")',
            f"  reply = client.chat.completions.create(model={model!r}, messages=[{message!r}])",
            "  print(reply.choices[0].message.content)",
            "",
            "Ask over gRPC:",
            f"  grpcurl -plaintext -d {shlex.quote(json.dumps(ask))} \\",
            f"    {grpc_target} opea.v1.ChatQnAService/Ask",
            "",
            "Press Ctrl-C to stop everything.",
        ]
    )


async def up(
    options: Options,
    env: Mapping[str, str],
    stop: asyncio.Event,
    *,
    out: TextIO | None = None,
    relay: TextIO | None = None,
) -> int:
    """Run everything until ``stop`` is set; the exit code (0: stopped as asked)."""
    out = out if out is not None else sys.stdout
    relay = relay if relay is not None else sys.stderr
    launch = _Launch(options, env, stop, relay)
    try:
        missing = [str(p) for p in options.docs if not p.exists()]
        if missing:
            raise LaunchError(f"--docs: no such file or folder: {', '.join(missing)}")
        docs = list(options.docs) or sample_corpus()
        if not options.free_ports:
            wanted = {n: options.port(n) for n in ("gateway", *SERVICES)}
            check_ports(options.host, {"gateway REST": options.rest_port} | wanted)
        log.info("starting %s, then the gateway", ", ".join(SERVICES))
        ports = await launch.until(launch.start(), options.ready_timeout)
        rest = f"http://{_address(launch.host, ports['rest'])}"
        summary = await launch.until(
            loader.ingest(rest, docs, collection=options.collection, progress=relay.isatty())
        )
        for problem in summary.failed:
            print(f"opea-grpc up: warning: left out {problem}", file=relay, flush=True)
        model = await launch.until(_chat_model(_address(launch.host, ports["chat"])))
        question = SAMPLE_QUESTION if not options.docs else _question(summary)
        text = banner(ports, launch.host, model, question, summary, options.data_dir)
        print(text, file=out, flush=True)
        await launch.until(asyncio.Event().wait())
    except _Stopped:
        log.info("stopping: the gateway, then the services")
        return 0
    except (LaunchError, loader.IngestError) as exc:
        print(f"opea-grpc up: {exc}", file=relay, flush=True)
        return 1
    finally:
        await launch.stop_all()
        if launch.run_dir is not None:
            shutil.rmtree(launch.run_dir, ignore_errors=True)
    return 0


def _question(summary: loader.Summary) -> str:
    title = summary.titles[0] if summary.titles else ""
    return f"What is {title}?" if title else "What do these documents cover?"
