"""The ChatQnA pipeline through the gateway's REST facade: req/s, latency, TTFT, CPU per request.

Starts four services (trivial ones by default: bench/trivial.py; ``--services real`` for the
built-in embedded backends) and the gateway, each its own process on a free loopback port,
waits for gRPC health and ``GET /readyz``, then drives ``POST /v1/chat/completions`` at each
concurrency level, non-streamed and streamed. Per level it prints req/s, latency p50/p99, for
streams the time to first token (first content delta) p50/p99, errors, the servers' CPU
(user + system, from psutil) per request summed over all five processes and per process, and
the load generator's own CPU per request.

Load generators, chosen so that the client does not take the CPU the servers need on two
cores: ``wrk`` (a Lua script posting a distinct question per request) for the non-streamed
levels above 1 (``hey`` when wrk is missing or a request count is asked for: it posts one body,
so it asks the gateway to bypass its caches); a lean asyncio HTTP/1.1 client (``raw``, a few
byte searches per read) for the streamed levels above 1, where httpx would spend more CPU per
completion than the servers; one pooled ``httpx`` client at level 1. Last, the time to first
token at concurrency 1 through the gateway (httpx and raw) is set against calling the chat
service's ChatStream directly over gRPC, and against the four gRPC hops made directly.

    python bench/pipeline.py [--levels 1,8,64] [--duration 5 | --requests N] [--warmup 1]
                             [--loadgen auto|wrk|hey|httpx|raw] [--services trivial|real]
                             [--same-question] [--no-stream] [--gateway URL [--chat HOST:PORT]]
                             [--trace] [--metrics] [--repeat N] [--transport unix|tcp]

Each question is distinct unless ``--same-question``, so the gateway's caches miss (the worst
case); with it they hit after the first request. ``--gateway URL`` drives a running gateway
and measures only the process listening on its port (if it is on this machine). ``--trace``
turns tracing on in every process (spans exported over OTLP/gRPC to a receiver in the bench's
own process, as to a collector); ``--metrics`` gives every service a metrics port.
The gateway calls the services over their Unix sockets, as ``opea-grpc up`` has it
(``--transport tcp``: over loopback TCP, as between machines or containers).
``--repeat N`` measures each level N times in a row and judges the targets on the medians: on
a shared two-core machine the CPU per request drifts by tens of percent over minutes, every
process alike, so one short run says little.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from opea_grpc.channel import connect  # noqa: E402
from opea_grpc.client import (  # noqa: E402
    ChatClient,
    EmbeddingClient,
    RerankClient,
    RetrievalClient,
)
from opea_grpc.pb.v1 import (  # noqa: E402
    chat_pb2,
    embedding_pb2,
    rerank_pb2,
    retrieval_pb2,
)
from opea_grpc.testing import wait_for_serving  # noqa: E402

SERVICES = ("embedding", "retrieval", "rerank", "chat")
GRPC_LISTENING = re.compile(r"^\S+ listening on (\S+:\d+)\s*$", re.MULTILINE)
REST_LISTENING = re.compile(r"REST listening on (http://\S+)")
QUESTION = "What does gRPC carry between the services of a pipeline?"
HEADERS = {"Content-Type": "application/json"}
INSTALL = "apt-get install -y wrk hey (or pass --loadgen raw)"
#: Passages ingested for ``--services real``, so retrieval has something to find.
CORPUS = [
    "gRPC carries typed protobuf messages over HTTP/2 between the services of a pipeline.",
    "A megaservice composes microservices: embedding, retrieval, rerank and chat.",
    "Health checks tell a load balancer which replicas can take calls.",
    "Server reflection lets grpcurl list and describe every service on a port.",
]


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Child:
    """A server process, where it listens, and the files its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    target: str = ""
    url: str = ""
    #: Where the gateway calls it: its Unix socket (``--transport unix``), else ``target``.
    route: str = ""

    def output(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]


def spawn(name: str, argv: Sequence[str], env: Mapping[str, str], logs: Path) -> Child:
    """Start ``python ARGV`` in the checkout; its stdout and stderr go to files in ``logs``."""
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=dict(env), stdout=stdout, stderr=stderr
        )
    return Child(name, proc, out, err)


async def announced(child: Child, patterns: Sequence[re.Pattern[str]], timeout: float) -> None:
    """Wait until ``child`` printed a line matching each pattern; fill its target and URL."""
    deadline = time.monotonic() + timeout
    while True:
        text = child.stdout.read_text(errors="replace")
        found = [p.search(text) for p in patterns]
        if all(found):
            child.target = found[0][1] if found[0] else ""
            child.url = found[1][1] if len(found) > 1 and found[1] else ""
            return
        if child.proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if child.proc.poll() is not None else f"not ready in {timeout:.0f} s"
            raise SystemExit(f"{child.name} {why}; its stderr ends:\n{child.output()}")
        await asyncio.sleep(0.05)


async def ready(url: str, timeout: float) -> None:
    """Poll ``GET url/readyz`` until 200."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=2.0) as client:
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{url}/readyz did not answer 200 within {timeout:.0f} s")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def pipeline(args: argparse.Namespace) -> AsyncIterator[list[Child]]:
    """The four services and the gateway, started and ready; stopped on leaving."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    data = tempfile.TemporaryDirectory(prefix="bench-pipeline-")
    children: list[Child] = []
    sink = None
    if args.trace:  # every process exports its spans to a receiver in this process
        sink = await SpanSink.start()
        env.update(sink.env)
    try:
        for name in SERVICES:
            if args.services == "trivial":
                spec = f"bench.trivial:{name}"
            else:
                spec = name
                env["OPEA_RETRIEVAL_DATA_DIR"] = str(Path(data.name) / "index")
                if args.embedding_backend:
                    env["OPEA_EMBEDDING_BACKEND"] = args.embedding_backend
            argv = ["-m", "opea_grpc", "serve", spec, "--host", "127.0.0.1", "--port", "0"]
            own = dict(env, OPEA_METRICS_PORT=str(free_port())) if args.metrics else dict(env)
            socket = str(Path(data.name) / f"{name}.sock")
            if args.transport == "unix":  # as opea-grpc up runs them
                own["OPEA_UNIX_SOCKET"] = socket
            children.append(spawn(name, argv, own, Path(data.name)))
            children[-1].route = f"unix:{socket}" if args.transport == "unix" else ""
        for child in children:
            await announced(child, [GRPC_LISTENING], args.start_timeout)
            child.route = child.route or child.target
            channel = connect(child.target, [])
            try:
                await wait_for_serving(channel, timeout=args.start_timeout)
            finally:
                await channel.close(None)
        gateway_env = dict(env, OPEA_GATEWAY_REST_PORT="0")
        for child in children:
            gateway_env[f"OPEA_GATEWAY_{child.name.upper()}"] = child.route
        argv = [*shlex.split(args.gateway_argv), "--host", "127.0.0.1", "--port", "0"]
        gateway = spawn("gateway", argv, gateway_env, Path(data.name))
        children.append(gateway)
        await announced(gateway, [GRPC_LISTENING, REST_LISTENING], args.start_timeout)
        gateway.route = gateway.target
        await ready(gateway.url, args.start_timeout)
        yield children
        if sink is not None:
            print(f"\ntracing on: {sink.spans} spans received over OTLP/gRPC")
    finally:
        if sink is not None:
            await sink.server.stop(None)
        for child in children:
            if child.proc.poll() is None:
                child.proc.terminate()
        for child in children:
            try:
                child.proc.wait(15)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        data.cleanup()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its living children."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine, if it can be seen."""
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return int(conn.pid) if conn.pid is not None else None
    return None


# -- measurements -------------------------------------------------------------------------------


@dataclass
class Sample:
    """What one generator run saw."""

    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    why: dict[str, int] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    #: From generators that only report percentiles (wrk, hey).
    p50_ms: float | None = None
    p99_ms: float | None = None

    def error(self, why: str) -> None:
        self.errors += 1
        self.why[why] = self.why.get(why, 0) + 1


@dataclass
class Row:
    stream: bool
    level: int
    client: str
    sample: Sample
    cpu: dict[str, float]
    client_cpu: float
    #: Cores that processes outside the measurement kept busy meanwhile (noise on the figures).
    others: float


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass(frozen=True)
class Load:
    """How much to send: for ``seconds``, or ``requests`` in all when set."""

    seconds: float
    requests: int | None = None

    def pace(self) -> Pace:
        return Pace(self)


class Pace:
    """Whether to send one more request (shared by the callers of one run)."""

    def __init__(self, load: Load) -> None:
        self._left = load.requests
        self._until = time.perf_counter() + load.seconds

    def more(self) -> bool:
        if self._left is None:
            return time.perf_counter() < self._until
        self._left -= 1
        return self._left >= 0


class Questions:
    """Request bodies: a distinct question each time, or the same one."""

    def __init__(self, model: str, *, same: bool, label: str) -> None:
        self.model, self.same, self.label, self.count = model, same, label, 0

    def payload(self, stream: bool, text: str) -> dict[str, object]:
        payload: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "stream": stream,
        }
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    def body(self, stream: bool) -> bytes:
        self.count += 1
        text = QUESTION if self.same else f"{QUESTION} ({self.label}-{self.count})"
        return json.dumps(self.payload(stream, text)).encode()

    def template(self, stream: bool) -> tuple[str, str]:
        """The body cut where a request number goes, for a generator that counts (wrk)."""
        head, tail = json.dumps(self.payload(stream, f"{QUESTION} ({self.label}-@@)")).split("@@")
        return head, tail


async def drive_httpx(
    url: str, questions: Questions, concurrency: int, load: Load, stream: bool
) -> Sample:
    """One pooled httpx client, ``concurrency`` callers; times the first token of a stream."""
    sample = Sample()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    endpoint = url + "/v1/chat/completions"
    started, pace = time.perf_counter(), load.pace()

    async def one(client: httpx.AsyncClient) -> None:
        body = questions.body(stream)
        start = time.perf_counter()
        if not stream:
            response = await client.post(endpoint, content=body, headers=HEADERS)
            if response.status_code != 200 or b'"choices"' not in response.content:
                sample.error(f"HTTP {response.status_code}")
                return
            sample.latency_ms.append((time.perf_counter() - start) * 1000)
            return
        first: float | None = None
        done = False
        async with client.stream("POST", endpoint, content=body, headers=HEADERS) as response:
            if response.status_code != 200:
                await response.aread()
                sample.error(f"HTTP {response.status_code}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                elif first is None or '"error"' in line[:16]:
                    event = json.loads(line[6:])
                    if "error" in event:
                        sample.error("error event")
                        return
                    choices = event.get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        first = time.perf_counter()
        if not done or first is None:
            sample.error("stream without content or [DONE]")
            return
        sample.latency_ms.append((time.perf_counter() - start) * 1000)
        sample.ttft_ms.append((first - start) * 1000)

    async def caller(client: httpx.AsyncClient) -> None:
        while pace.more():
            try:
                await one(client)
            except httpx.HTTPError as exc:
                sample.error(type(exc).__name__)

    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        await asyncio.gather(*(caller(client) for _ in range(concurrency)))
    sample.seconds = time.perf_counter() - started
    sample.requests = len(sample.latency_ms) + sample.errors
    return sample


#: A delta with content text, in an SSE frame of a chat completion chunk.
CONTENT = re.compile(rb'"delta":\s*\{[^{}]*"content":\s*"[^"]')


class Exchange(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: posts a body, reads the reply (sized or chunked).

    The lean client for streamed load: a callback per read and a few byte searches, where
    httpx spends several milliseconds of CPU per streamed completion, more than the servers.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._reply: asyncio.Future[tuple[int, float | None, bool]] | None = None
        self._status = 0
        self._length: int | None = None  # None: chunked
        self._headers_done = False
        self._first: float | None = None
        self._done_seen = False
        self._error = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def post(self, request: bytes) -> tuple[int, float | None, bool]:
        """Send ``request`` (a whole HTTP request); (status, first content time, well ended)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection is closed")
        self._reply = asyncio.get_running_loop().create_future()
        self._buffer.clear()
        self._headers_done, self._first, self._done_seen, self._error = False, None, False, False
        self.transport.write(request)
        return await self._reply

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._headers_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            self._status = int(head[9:12])
            found = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            self._length = int(found[1]) if found else None
            self._headers_done = True
            del buffer[: end + 4]
        if self._length is not None:
            if len(buffer) >= self._length:
                self._finish(bytes(buffer[: self._length]), last=True)
            return
        while True:  # chunked: size line, data, CRLF; a zero size ends the body
            line = buffer.find(b"\r\n")
            if line < 0:
                return
            size = int(bytes(buffer[:line]).split(b";")[0], 16)
            if len(buffer) < line + 2 + size + 2:
                return
            chunk = bytes(buffer[line + 2 : line + 2 + size])
            del buffer[: line + 2 + size + 2]
            self._finish(chunk, last=size == 0)
            if size == 0:
                return

    def _finish(self, chunk: bytes, *, last: bool) -> None:
        if chunk:
            if self._first is None and CONTENT.search(chunk):
                self._first = time.perf_counter()
            if b'data: {"error"' in chunk:
                self._error = True
            if chunk.endswith(b"data: [DONE]\n\n"):
                self._done_seen = True
            if self._length is not None and b'"choices"' in chunk:
                self._done_seen = True
        if last and self._reply is not None and not self._reply.done():
            ok = self._done_seen and not self._error
            self._reply.set_result((self._status, self._first, ok))


async def drive_raw(
    url: str, questions: Questions, concurrency: int, load: Load, stream: bool
) -> Sample:
    """``concurrency`` keep-alive connections of :class:`Exchange`; times the first token."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    path = "/v1/chat/completions"
    sample = Sample()
    loop = asyncio.get_running_loop()
    started, pace = time.perf_counter(), load.pace()

    async def caller() -> None:
        transport: asyncio.BaseTransport | None = None
        try:
            while pace.more():
                if transport is None or transport.is_closing():
                    transport, exchange = await loop.create_connection(Exchange, host, port)
                body = questions.body(stream)
                request = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body
                start = time.perf_counter()
                try:
                    status, first, ok = await exchange.post(request)
                except ConnectionError as exc:
                    sample.error(type(exc).__name__)
                    transport.close()
                    continue
                if status != 200 or not ok or (stream and first is None):
                    sample.error(f"HTTP {status}" if status != 200 else "bad or cut reply")
                    continue
                sample.latency_ms.append((time.perf_counter() - start) * 1000)
                if first is not None and stream:
                    sample.ttft_ms.append((first - start) * 1000)
        finally:
            if transport is not None:
                transport.close()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    sample.seconds = time.perf_counter() - started
    sample.requests = len(sample.latency_ms) + sample.errors
    return sample


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local head, tail, same = %(head)s, %(tail)s, %(same)s
local count = 0
if same then
  wrk.body = head .. tail
else
  request = function()
    count = count + 1
    return wrk.format(nil, nil, nil, head .. count .. tail)
  end
end
done = function(s, latency, requests)
  local e = s.errors
  io.write(string.format(
    "WRK {\\"requests\\": %%d, \\"us\\": %%d, \\"p50\\": %%d, \\"p99\\": %%d, \\"connect\\": %%d, "
    .. "\\"read\\": %%d, \\"write\\": %%d, \\"status\\": %%d, \\"timeout\\": %%d}\\n",
    s.requests, s.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def drive_wrk(
    url: str, questions: Questions, concurrency: int, load: Load, stream: bool
) -> Sample:
    """``wrk`` with a Lua script: a distinct question per request unless ``--same-question``."""
    if questions.same:
        head, tail = questions.body(stream).decode(), ""
    else:
        head, tail = questions.template(stream)
    script = WRK_SCRIPT % {
        "head": _lua_string(head),
        "tail": _lua_string(tail),
        "same": "true" if questions.same else "false",
    }
    if load.requests is not None:
        raise SystemExit("wrk runs for a duration: use --duration, or --loadgen hey or raw")
    seconds = max(1, round(load.seconds))  # wrk takes whole seconds
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s"]
        out = await _run([*argv, "-s", lua.name, url + "/v1/chat/completions"])
    match = re.search(r"^WRK (\{.*\})$", out, re.MULTILINE)
    if match is None:
        raise SystemExit(f"wrk printed no summary:\n{out}")
    figures = json.loads(match[1])
    sample = Sample(
        requests=figures["requests"],
        seconds=figures["us"] / 1e6,
        p50_ms=figures["p50"] / 1000,
        p99_ms=figures["p99"] / 1000,
    )
    for kind in ("connect", "read", "write", "status", "timeout"):
        if figures[kind]:
            sample.errors += figures[kind]
            sample.why[kind if kind != "status" else "non-2xx"] = figures[kind]
    return sample


async def drive_hey(
    url: str, questions: Questions, concurrency: int, load: Load, stream: bool
) -> Sample:
    """``hey``: one body for every request, so it asks the gateway to bypass its caches."""
    payload = json.loads(questions.body(stream))
    if not questions.same:
        payload["opea"] = {"cache": False}
    with tempfile.NamedTemporaryFile("wb", suffix=".json") as body:
        body.write(json.dumps(payload).encode())
        body.flush()
        amount = ["-n", str(load.requests)] if load.requests else ["-z", f"{load.seconds:g}s"]
        argv = ["hey", *amount, "-c", str(concurrency), "-t", "30", "-m", "POST"]
        out = await _run(
            [*argv, "-T", "application/json", "-D", body.name, url + "/v1/chat/completions"]
        )
    total = re.search(r"Total:\s+([\d.]+) secs", out)
    if total is None:
        raise SystemExit(f"hey printed no summary:\n{out}")
    sample = Sample(seconds=float(total[1]))
    for status, count in re.findall(r"\[(\d+)\]\s+(\d+) responses", out):
        sample.requests += int(count)
        if status != "200":
            sample.errors += int(count)
            sample.why[f"HTTP {status}"] = int(count)
    errors = out.split("Error distribution:", 1)
    for count, why in re.findall(r"\[(\d+)\]\s+(.+)", errors[1] if len(errors) > 1 else ""):
        sample.requests += int(count)
        sample.errors += int(count)
        sample.why[why[:60]] = int(count)
    for q, attr in (("50", "p50_ms"), ("99", "p99_ms")):
        found = re.search(rf"\b{q}%+ in ([\d.]+) secs", out)
        if found:
            setattr(sample, attr, float(found[1]) * 1000)
    return sample


async def _run(argv: Sequence[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} exited with {proc.returncode}:\n{out.decode()}")
    return out.decode()


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every process, every core)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- direct gRPC time to first token ------------------------------------------------------------


async def direct_ttft(targets: Mapping[str, str], load: Load, *, hops: bool) -> list[float]:
    """TTFT (ms) of ChatStream called directly at concurrency 1; with ``hops``, after the
    embed, search and rerank calls the gateway makes, made directly from here."""
    channels = {name: connect(target, []) for name, target in targets.items()}
    chat = ChatClient(channels["chat"])
    embed = EmbeddingClient(channels["embedding"]) if hops else None
    search = RetrievalClient(channels["retrieval"]) if hops else None
    rerank = RerankClient(channels["rerank"]) if hops and "rerank" in channels else None
    ttft: list[float] = []
    try:
        for channel in channels.values():  # connected before the clock starts
            await asyncio.wait_for(channel.channel_ready(), 10)
        pace, n = load.pace(), 0
        while pace.more():
            n += 1
            text = f"{QUESTION} (direct-{n})"
            start = time.perf_counter()
            request = chat_pb2.ChatRequest(
                messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content=text)]
            )
            if embed is not None and search is not None:
                vector = (await embed.embed(embedding_pb2.EmbedRequest(input=[text]))).data[0]
                found = await search.search(
                    retrieval_pb2.SearchRequest(vector=vector.embedding, query=text, top_k=10)
                )
                docs = [hit.document for hit in found.documents]
                if rerank is not None and docs:
                    ranked = await rerank.rerank(
                        rerank_pb2.RerankRequest(query=text, documents=docs, top_n=3)
                    )
                    docs = [r.document for r in ranked.results]
                request.documents.extend(docs[:3])
            first: float | None = None
            async for chunk in chat.chat_stream(request):
                if first is None and chunk.content:
                    first = time.perf_counter()
            if first is not None:
                ttft.append((first - start) * 1000)
    finally:
        for channel in channels.values():
            await channel.close(None)
    return ttft


# -- the run ------------------------------------------------------------------------------------


def loadgen_for(args: argparse.Namespace, level: int, stream: bool) -> str:
    """httpx at level 1; above it wrk (else hey) when not streamed, else the lean raw client."""
    if args.loadgen != "auto":
        return str(args.loadgen)
    if level == 1:
        return "httpx"
    if stream:
        return "raw"
    for tool in ("wrk", "hey") if args.requests is None else ("hey",):  # wrk cannot count
        if shutil.which(tool):
            return tool
    if args.requests is not None:
        return "raw"
    raise SystemExit(f"neither wrk nor hey is installed: {INSTALL}")


async def measure(
    args: argparse.Namespace,
    url: str,
    model: str,
    pids: Mapping[str, int],
    level: int,
    stream: bool,
    run: int = 0,
) -> Row:
    client = loadgen_for(args, level, stream)
    if client in ("wrk", "hey") and shutil.which(client) is None:
        raise SystemExit(f"{client} is not installed: {INSTALL}")
    drive = {"httpx": drive_httpx, "raw": drive_raw, "wrk": drive_wrk, "hey": drive_hey}[client]
    label = f"{'s' if stream else 'u'}{level}r{run}"  # distinct questions in every run
    if args.warmup > 0:
        await drive(url, Questions(model, same=args.same_question, label=label + "w"), level,
                    Load(args.warmup), stream)  # fmt: skip
    questions = Questions(model, same=args.same_question, label=label)
    load = Load(args.duration, args.requests)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy, wall = machine_busy(), time.monotonic()
    in_process = client in ("httpx", "raw")
    own = self_cpu() if in_process else children_cpu()
    sample = await drive(url, questions, level, load, stream)
    own = (self_cpu() if in_process else children_cpu()) - own
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    others = (machine_busy() - busy - sum(cpu.values()) - own) / (time.monotonic() - wall)
    return Row(stream, level, client, sample, cpu, own, max(0.0, others))


def ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def print_rows(rows: Sequence[Row], names: Sequence[str]) -> None:
    short = {"embedding": "emb", "retrieval": "ret", "rerank": "rr", "chat": "chat"}
    cols = "".join(f"{short.get(n, n):>7}" for n in names if n != "gateway")
    print(
        f"{'mode':<7}{'conc':>5} {'client':<7}{'reqs':>7}{'req/s':>8}{'p50':>8}{'p99':>8}"
        f"{'ttft50':>8}{'ttft99':>8}{'errs':>6}{'srv CPU':>9}{'gw':>7}{'gw%':>5}{cols}"
        f"{'client':>8}{'other':>7}"
    )
    for r in rows:
        s, done = r.sample, max(1, r.sample.requests)
        p50 = s.p50_ms if s.p50_ms is not None else percentile(s.latency_ms, 50)
        p99 = s.p99_ms if s.p99_ms is not None else percentile(s.latency_ms, 99)
        ttft = [ms(percentile(s.ttft_ms, q)) if s.ttft_ms else "-" for q in (50, 99)]
        total = sum(r.cpu.values()) * 1000 / done
        gateway = r.cpu.get("gateway", 0.0) * 1000 / done
        share = f"{gateway / total:.0%}" if total else "-"
        per = "".join(f"{r.cpu[n] * 1000 / done:>7.2f}" for n in names if n != "gateway")
        print(
            f"{'stream' if r.stream else 'unary':<7}{r.level:>5} {r.client:<7}{s.requests:>7}"
            f"{s.requests / s.seconds:>8.0f}{ms(p50):>8}{ms(p99):>8}{ttft[0]:>8}{ttft[1]:>8}"
            f"{s.errors:>6}{ms(total if r.cpu else None):>9}{ms(gateway if r.cpu else None):>7}"
            f"{share:>5}{per}{r.client_cpu * 1000 / done:>8.2f}{r.others:>7.2f}"
        )
        if s.why:
            print(f"{'':13}errors: " + ", ".join(f"{k}: {v}" for k, v in s.why.items()))
    print(
        "latency and TTFT in ms (client-side); CPU in ms per request (user + system): srv = the "
        "servers together, gw = the gateway, then each service; client = the load generator; "
        "other = cores busy outside these processes meanwhile (load that skews the figures)"
    )


async def chat_model(url: str, wanted: str | None) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        ids = [m["id"] for m in response.json()["data"]]
    if wanted:
        return wanted
    for pick in ("trivial-chat", "extractive-answerer"):
        if pick in ids:
            return pick
    chatty = [i for i in ids if "chat" in i or "answer" in i]
    if not chatty and not ids:
        raise SystemExit(f"{url}/v1/models lists no model")
    return str((chatty or ids)[0])


async def ingest(url: str) -> None:
    documents = [{"id": f"corpus-{i}", "text": text} for i, text in enumerate(CORPUS)]
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        response = await client.post("/v1/ingest", json={"documents": documents})
        if response.status_code != 200:
            raise SystemExit(f"ingest failed: {response.status_code} {response.text}")


async def run(args: argparse.Namespace, url: str, pids: Mapping[str, int],
              targets: Mapping[str, str]) -> None:  # fmt: skip
    model = await chat_model(url, args.model)
    rows: list[Row] = []
    modes = [False] if args.no_stream else [False, True]
    for stream in modes:
        for level in args.levels:
            for n in range(args.repeat):
                rows.append(await measure(args, url, model, pids, level, stream, n))
    what = f"{len(pids)} processes measured" if pids else "server CPU not measured"
    amount = f"{args.requests} requests" if args.requests else f"{args.duration:g} s"
    hops = "" if args.gateway else f", the services reached over {args.transport}"
    print(f"\npipeline through {url}, model {model}, {amount} per level ({what}{hops})")
    print(f"questions: {'one, repeated' if args.same_question else 'distinct per request'}")
    print_rows(rows, list(pids) if pids else ["gateway"])
    merged = await batches(url)
    if merged:
        print("requests per downstream call, whole run (OPEA_GATEWAY_COALESCE): "
              + ", ".join(f"{node} {mean:.2f}" for node, mean in merged.items()))  # fmt: skip

    ttft = await first_tokens(args, url, model, targets)
    print("\ntime to first token at concurrency 1, ms (p50 / p99):")
    for name, values in ttft.items():
        if values:
            p50, p99 = percentile(values, 50), percentile(values, 99)
            print(f"  {name:<46}{p50:>8.2f} / {p99:.2f}  ({len(values)} requests)")
    if args.services == "trivial" or args.gateway:
        verdicts(args, rows, ttft)
    else:
        print("\n(the targets are for the trivial services: not checked with real ones)")


async def batches(url: str) -> dict[str, float]:
    """Mean requests per call of each coalescing node, from the gateway's /metrics."""
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"{url}/metrics")
    if answer.status_code != 200:
        return {}
    counts: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name in ("opea_gateway_coalesced_calls_total",
                               "opea_gateway_coalesced_requests_total"):  # fmt: skip
                kind = "calls" if "calls" in sample.name else "requests"
                counts.setdefault(sample.labels["node"], {})[kind] = sample.value
    return {node: c["requests"] / c["calls"] for node, c in counts.items() if c.get("calls")}


GATEWAY_HTTPX = "through the gateway, httpx client"
GATEWAY_RAW = "through the gateway, raw asyncio client"
DIRECT = "ChatStream directly over gRPC"
HOPS = "embed, search, rerank, ChatStream directly"


async def first_tokens(
    args: argparse.Namespace,
    url: str,
    model: str,
    targets: Mapping[str, str],
) -> dict[str, list[float]]:
    """TTFT samples at concurrency 1: through the gateway (two clients) and direct over gRPC.

    The measurements take turns, a slice of the load each, so that the machine's drift from
    one minute to the next weighs on every one of them alike (the verdict is a difference).
    """
    load, warmup = Load(args.duration, args.requests), Load(args.warmup)
    found: dict[str, list[float]] = {}
    measures: dict[str, Callable[[Load], Awaitable[list[float]]]] = {}
    if not args.no_stream:
        questions = Questions(model, same=args.same_question, label="t")

        async def pooled(part: Load) -> list[float]:
            return (await drive_httpx(url, questions, 1, part, True)).ttft_ms

        async def raw(part: Load) -> list[float]:
            return (await drive_raw(url, questions, 1, part, True)).ttft_ms

        measures[GATEWAY_HTTPX], measures[GATEWAY_RAW] = pooled, raw
    if "chat" in targets:
        measures[DIRECT] = lambda part: direct_ttft(targets, part, hops=False)
    if {"embedding", "retrieval", "chat"} <= set(targets):
        measures[HOPS] = lambda part: direct_ttft(targets, part, hops=True)
    for measure in measures.values():
        await measure(warmup)
    turns = TTFT_TURNS
    part = Load(load.seconds / turns, None if load.requests is None else -(-load.requests // turns))
    for _ in range(turns):
        for name, measure in measures.items():
            found.setdefault(name, []).extend(await measure(part))
    return found


#: Turns the c=1 TTFT measurements take.
TTFT_TURNS = 8


def verdicts(
    args: argparse.Namespace, rows: Sequence[Row], ttft: Mapping[str, Sequence[float]]
) -> None:
    print("\ntargets (the CPU budget is for the loaded gateway, at the highest concurrency):")
    unary = [r for r in rows if not r.stream and r.cpu and r.sample.requests]
    levels = sorted({r.level for r in unary})
    for level in levels:
        runs = [sum(r.cpu.values()) * 1000 / r.sample.requests for r in unary if r.level == level]
        cpu = statistics.median(runs)
        top = level == levels[-1]
        verdict = ("ok" if cpu <= args.target_cpu else "MISSED") if top else "(for reference)"
        spread = (
            f", median of {len(runs)} runs: {min(runs):.2f}-{max(runs):.2f}" if runs[1:] else ""
        )
        print(
            f"  server CPU per non-streamed request at c={level}: {cpu:.2f} ms "
            f"(<= {args.target_cpu:g} ms{spread}) {verdict}"
        )
    fast = [r for r in unary if r.level == 64]
    if fast:
        rps = statistics.median(r.sample.requests / r.sample.seconds for r in fast)
        failed = sum(r.sample.errors for r in fast)
        verdict = "ok" if rps >= args.target_rps and not failed else "MISSED"
        print(f"  non-streamed req/s at c=64: {rps:.0f} (>= {args.target_rps:g}) {verdict}")
    direct, hops = ttft.get(DIRECT), ttft.get(HOPS)
    for client in (GATEWAY_RAW, GATEWAY_HTTPX):
        through = ttft.get(client)
        if not through:
            continue
        p50 = percentile(through, 50)
        name = client.split(", ")[1]
        if hops:  # what the gateway adds to the four gRPC calls the pipeline makes anyway
            added = p50 - percentile(hops, 50)
            verdict = "ok" if added < args.target_ttft else "MISSED"
            if client == GATEWAY_HTTPX:  # httpx spends about 1 ms of CPU a request itself
                verdict = "(for reference: httpx's own work is in it)"
            print(
                f"  TTFT p50 the gateway adds at c=1 ({name}) over the four gRPC calls made "
                f"directly: {added:.2f} ms (< {args.target_ttft:g} ms) {verdict}"
            )
        if direct:
            added = p50 - percentile(direct, 50)
            print(f"    over one bare ChatStream call: {added:.2f} ms (for reference)")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SpanSink:
    """An OTLP/gRPC trace receiver that counts spans (``--trace``): what a collector would take."""

    def __init__(self, server: typing.Any, port: int) -> None:
        self.server, self.spans = server, 0
        self.env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }

    @classmethod
    async def start(cls) -> SpanSink:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        sink = cls(server, port)

        class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(
                self, request: typing.Any, context: typing.Any
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                sink.spans += sum(
                    len(s.spans) for rs in request.resource_spans for s in rs.scope_spans
                )
                return trace_service_pb2.ExportTraceServiceResponse()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)  # type: ignore[no-untyped-call]
        await server.start()
        return sink


async def main_async(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # cancel, so the servers are stopped
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    if args.gateway:
        url = args.gateway.rstrip("/")
        port = httpx.URL(url).port or 80
        pid = listening_pid(port)
        pids = {"gateway": pid} if pid is not None else {}
        targets = {"chat": args.chat} if args.chat else {}
        await run(args, url, pids, targets)
        return
    async with pipeline(args) as children:
        gateway = children[-1]
        if args.services == "real":
            await ingest(gateway.url)
        pids = {c.name: c.proc.pid for c in children}
        targets = {c.name: c.route for c in children if c.name != "gateway"}
        print("started: " + ", ".join(f"{c.name} {c.route}" for c in children)
              + f"; REST {gateway.url}")  # fmt: skip
        await run(args, gateway.url, pids, targets)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8,64", help="concurrency levels (default 1,8,64)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    parser.add_argument("--requests", type=int, help="requests per level instead of seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per level")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each level this many times; the verdicts take the median (this machine's"
        " CPU figures drift by tens of percent from minute to minute)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "hey", "httpx", "raw"),
        default="auto",
        help="auto: httpx at 1, then wrk (else hey) unary and the raw asyncio client streamed",
    )
    parser.add_argument("--services", choices=("trivial", "real"), default="trivial")
    parser.add_argument(
        "--transport",
        choices=("unix", "tcp"),
        default="unix",
        help="how the gateway reaches the services: their Unix sockets, as opea-grpc up runs"
        " them (default), or loopback TCP",
    )
    parser.add_argument("--embedding-backend", help="with --services real (e.g. hashing)")
    parser.add_argument("--same-question", action="store_true", help="let the caches hit")
    parser.add_argument("--no-stream", action="store_true", help="skip the streamed levels")
    parser.add_argument(
        "--trace", action="store_true",
        help="tracing on in every process, exporting over OTLP/gRPC to a receiver here",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", action="store_true", help="every service records and serves its metrics"
    )
    parser.add_argument("--gateway", help="drive this running gateway (http://host:port)")
    parser.add_argument("--chat", help="with --gateway: chat service host:port for direct TTFT")
    parser.add_argument("--model", help="chat model (default: from /v1/models)")
    parser.add_argument(
        "--gateway-argv",
        default="-m opea_grpc serve gateway",
        help="python arguments that start the gateway (--host and --port are added)",
    )
    parser.add_argument("--start-timeout", type=float, default=60.0)
    parser.add_argument("--target-cpu", type=float, default=2.5, help="ms per request")
    parser.add_argument("--target-rps", type=float, default=500.0, help="req/s at c=64")
    parser.add_argument("--target-ttft", type=float, default=2.0, help="ms added at c=1")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",") if level.strip()]
    if not args.levels or min(args.levels) < 1:
        parser.error("--levels takes positive integers, e.g. 1,8,64")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be >= 1")
    return args


def main() -> None:
    try:
        asyncio.run(main_async(parse_args()))
    except asyncio.CancelledError:
        raise SystemExit("interrupted") from None


if __name__ == "__main__":
    main()
